//! `kiln grpo`: reinforcement learning with Group Relative Policy Optimization (DeepSeekMath §4.1;
//! DeepSeek-V3 §5.2.2), on compiled programs alone.
//!
//! Each step takes the next `--prompts-per-step` prompts (in order, wrapping around) and:
//!
//! 1. samples `--group` completions of each from the current policy: the model's `prefill` and
//!    `decode` programs (the artifact `--out/policy.kiln`, loaded with the trainer's weights), at
//!    `--temperature`, each ending at the end-of-sequence token or after `--max-new-tokens`;
//! 2. scores each completion with the rule-based rewards ([`reward`]: the exact answer, a format
//!    check) and turns the rewards into group-relative advantages ([`objective::advantages`]);
//! 3. reads every completion token's log-probability from the `score` program, under the policy
//!    that sampled (`old`) and under the frozen reference model (the initial weights);
//! 4. takes `--updates` optimizer steps on the clipped objective with the k3 KL penalty
//!    ([`objective::Objective`]). Each is one run of the compiled train step with token weights:
//!    the weights are the objective's derivative by each token's log-probability, so the step's
//!    gradient is the objective's. Before each update after the first, the current policy's
//!    log-probabilities are scored again (the ratio `ρ` moves off 1 and the clip can act).
//!
//! Each step prints and logs (`metrics.jsonl`) the mean reward, each reward's mean, the
//! objective, the KL term, the clipped fraction, the gradient norm and the completions' length.
//! `--save-every K` (and the last step) writes `step-N/`, a Hugging Face folder (config.json,
//! model.safetensors, and the tokenizer files) that `kiln run`, `kiln chat` and another `kiln grpo`
//! load, with what a resume needs besides: AdamW's state (`optimizer.safetensors`) and the run's
//! position (`grpo.json`: the step, the sampling settings, fingerprints of the reference model and
//! of the prompts).
//! `--resume DIR/step-N`, given the run's model and initial weights again (the reference model),
//! continues it: N steps then M more are N + M steps, byte for byte, since step k takes prompts
//! and samples by k alone. At the end, `report.html` charts the run (`kiln report`: rewards, KL,
//! loss, gradient norm). Not done yet: sampling on a GPU.

pub mod objective;
pub mod reward;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use kiln_compiler::{build, pack, spec};
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::data::TokenRows;
use kiln_runtime::generate::{generate, GenerateOptions, Sampling};
use kiln_runtime::train::CompiledTrainer;
use kiln_runtime::weights::{self, HostTensor, StoreFloats};

use crate::chat::template::{self, ChatTemplate, Message};
use crate::run::{self, Weights};
use crate::tokenize::TextTokenizer;
use objective::{Completion, Objective};

/// What `kiln grpo` was asked.
pub struct Request<'a> {
    /// A model spec, Hugging Face config.json or folder.
    pub model: &'a Path,
    pub weights: Weights<'a>,
    /// The folder of tokenizer.json (and tokenizer_config.json for chat prompts).
    pub tokenizer: Option<&'a Path>,
    /// JSONL: `{"prompt": TEXT, "answer": TEXT}` or `{"messages": [...], "answer": TEXT}`.
    pub prompts: &'a Path,
    pub out: &'a Path,
    pub steps: u64,
    pub prompts_per_step: usize,
    pub group: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub lr: f64,
    pub objective: Objective,
    pub updates: usize,
    pub rewards: Vec<String>,
    pub format_pattern: String,
    pub seed: u64,
    pub threads: Option<usize>,
    pub save_every: Option<u64>,
    /// A checkpoint of an earlier run of the same model, initial weights and sampling settings, to
    /// continue from.
    pub resume: Option<&'a Path>,
    /// The optimizer's settings (`kiln train`'s flags).
    pub settings: crate::train::Settings,
}

/// Where a run stands, in each checkpoint (`grpo.json`), for `--resume`.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Progress {
    /// Steps taken.
    step: u64,
    model: String,
    /// What decides the prompts and samples of step k, besides k: the sampling seed, prompts per
    /// step and completions per prompt.
    seed: u64,
    prompts_per_step: usize,
    group: usize,
    /// The reference model's weights, as [`fingerprint`] gives them.
    reference: String,
    /// The prompts, in order, with their answers, as [`fingerprint`] gives them.
    prompts: String,
}

const PROGRESS: &str = "grpo.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// FNV-1a (64 bits) over each tensor's name, dtype, shape and values, in name order: two runs'
/// reference models are the same weights when their fingerprints are.
fn fingerprint<'t>(tensors: impl IntoIterator<Item = &'t HostTensor>) -> String {
    let mut sorted: Vec<&HostTensor> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in sorted {
        eat(t.name.as_bytes());
        eat(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        match &t.data {
            weights::HostData::F32(v) => v.iter().for_each(|x| eat(&x.to_bits().to_le_bytes())),
            weights::HostData::I64(v) => v.iter().for_each(|x| eat(&x.to_le_bytes())),
        }
    }
    format!("{h:016x}")
}

/// The prompts' token ids and answers, in order, as [`fingerprint`] hashes tensors.
fn prompts_fingerprint(prompts: &[Prompt]) -> String {
    let tensors: Vec<HostTensor> = (prompts.iter().enumerate())
        .map(|(i, p)| HostTensor {
            name: format!("{i:08} {}", p.answer),
            dtype: kiln_ir::DType::I64,
            shape: vec![p.ids.len() as u64],
            data: weights::HostData::I64(p.ids.clone()),
        })
        .collect();
    fingerprint(&tensors)
}

/// The checkpoint `dir`'s position, checked against this run: the same model, reference weights and
/// sampling settings.
fn resume_point(dir: &Path, want: &Progress) -> Result<Progress> {
    let path = dir.join(PROGRESS);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}: --resume takes a step-N folder of a kiln grpo run", path.display())
    })?;
    let p: Progress = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a kiln grpo run's state", path.display()))?;
    if p.model != want.model {
        bail!("{}: a checkpoint of model `{}`, not `{}`", dir.display(), p.model, want.model);
    }
    if p.reference != want.reference {
        bail!(
            "{}: the run's reference model (its initial weights) differs from the weights given: resume with the \
             model and --weights (or --random-weights) the run started from",
            dir.display()
        );
    }
    if p.prompts != want.prompts {
        bail!(
            "{}: the run took its prompts from another file (or another tokenizer): a resume continues the \
             run's prompts, so give the same --prompts",
            dir.display()
        );
    }
    let settings = [
        ("--seed", p.seed.to_string(), want.seed.to_string()),
        ("--prompts-per-step", p.prompts_per_step.to_string(), want.prompts_per_step.to_string()),
        ("--group", p.group.to_string(), want.group.to_string()),
    ];
    for (flag, was, given) in settings {
        if was != given {
            bail!(
                "{}: the run sampled with {flag} {was}, and this resume asks for {given}: a resume continues \
                 the run's prompts and samples, so give {flag} {was}",
                dir.display()
            );
        }
    }
    Ok(p)
}

/// One prompt of the data: its token ids and its reference answer.
struct Prompt {
    ids: Vec<i64>,
    answer: String,
}

const METRICS: &str = "metrics.jsonl";

pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    if req.group < 2 {
        bail!("--group {}: GRPO compares at least 2 completions of each prompt", req.group);
    }
    if req.prompts_per_step == 0 || req.steps == 0 || req.updates == 0 || req.max_new_tokens == 0 {
        bail!("--prompts-per-step, --steps, --updates and --max-new-tokens must be at least 1");
    }
    if !(req.temperature > 0.0 && req.temperature.is_finite() && req.top_p > 0.0 && req.top_p <= 1.0) {
        bail!("--temperature must be positive and --top-p in (0, 1]: GRPO samples its completions");
    }
    if !(req.lr.is_finite() && req.lr >= 0.0) {
        bail!("--lr must be a finite, non-negative number, not {}", req.lr);
    }
    let Objective { beta, clip } = req.objective;
    if !(beta.is_finite() && beta >= 0.0 && clip.is_finite() && clip > 0.0 && clip < 1.0) {
        bail!("--kl must be non-negative and --clip-ratio in (0, 1), not {beta} and {clip}");
    }
    let rewards = reward::parse(&req.rewards, &req.format_pattern)?;
    if req.settings.mtp_lambda.is_some_and(|l| l > 0.0) || req.settings.balance_alpha.is_some_and(|a| a > 0.0)
    {
        bail!("--mtp-lambda and --balance-alpha are pre-training losses; GRPO's objective has neither");
    }
    let config = req.model.join("config.json");
    let path = if req.model.is_dir() && config.is_file() { config.as_path() } else { req.model };
    let spec = spec::load(path)?;
    let folder = tokenizer_folder(req)?;
    if !folder.join(crate::tokenize::TOKENIZER_FILE).is_file() {
        bail!(
            "{} has no {}: kiln grpo reads prompts and completions as text; give the folder of the model's \
             tokenizer with --tokenizer DIR",
            folder.display(),
            crate::tokenize::TOKENIZER_FILE
        );
    }
    let tok = crate::tokenize::load(&folder)?;
    let prompts = load_prompts(req.prompts, &tok, &folder)?;
    let eos = spec.model.eos_token_id.map(|e| e as i64);
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let width = longest + req.max_new_tokens;
    if width as u64 > spec.model.max_position_embeddings {
        bail!(
            "{}: the longest prompt ({longest} tokens) and --max-new-tokens {} exceed the model's context of {}",
            req.prompts.display(),
            req.max_new_tokens,
            spec.model.max_position_embeddings
        );
    }
    let rows = req.prompts_per_step * req.group;
    std::fs::create_dir_all(req.out).with_context(|| format!("cannot create {}", req.out.display()))?;

    // The weights: the reference model keeps the initial ones; the trainer updates its copy.
    let decls = weights::graph_params(&build::build_graph(&spec)?)?;
    let mut ckpt = None;
    let initial: Vec<HostTensor> =
        run::params(decls.clone(), &req.weights, Some(&spec), &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
    let mut progress = Progress {
        step: 0,
        model: spec.model.name.clone(),
        seed: req.seed,
        prompts_per_step: req.prompts_per_step,
        group: req.group,
        reference: fingerprint(&initial),
        prompts: prompts_fingerprint(&prompts),
    };
    // A resume's policy: the checkpoint's weights (checked before anything is compiled).
    let resumed: Option<Vec<HostTensor>> = match req.resume {
        Some(dir) => {
            progress.step = resume_point(dir, &progress)?.step;
            if !dir.join(OPTIMIZER).is_file() {
                bail!("{}: no {OPTIMIZER}, so AdamW's state cannot resume", dir.display());
            }
            let mut c = None;
            let w = run::params(decls, &Weights::Checkpoint(dir), Some(&spec), &mut c)?;
            Some(w.collect::<Result<Vec<_>, _>>()?)
        }
        None => None,
    };
    let t0 = Instant::now();
    let target = kiln_compiler::target::Targets::Cpu;
    let policy_dir = req.out.join("policy.kiln");
    let policy_opts = pack::Options { ..pack::Options::new(target, rows as u64, width as u64) };
    pack::write(&pack::compile(pack::Source::Spec(spec.clone()), &policy_opts, &mut ())?, &policy_dir)?;
    let mut entry = req.settings.over(crate::train::Settings::defaults(), None)?;
    entry.token_weights = true;
    let train = pack::TrainOptions {
        losses: crate::train::losses_of(&entry),
        optimizer: crate::train::optimizer_of(&entry),
        accumulate: false,
        data_parallel: false,
        expert_parallel: None,
    };
    let train_opts = pack::Options {
        train: Some(train),
        kv_cache: false,
        score: false,
        ..pack::Options::new(target, rows as u64, (width - 1) as u64)
    };
    let train_dir = req.out.join("train.kiln");
    pack::write(&pack::compile(pack::Source::Spec(spec.clone()), &train_opts, &mut ())?, &train_dir)?;
    writeln!(
        out,
        "compiled the policy ({}) and the train step ({}) in {:.1} s",
        policy_dir.display(),
        train_dir.display(),
        t0.elapsed().as_secs_f64()
    )?;
    let policy_art = kiln_runtime::artifact::load(&policy_dir)?;
    let train_art = kiln_runtime::artifact::load(&train_dir)?;
    let options = run::cpu_options(req.threads);
    let load =
        |art: &kiln_runtime::artifact::Artifact, tensors: &HashMap<String, HostTensor>| -> Result<CpuModel> {
            let wanted = weights::manifest_params(art.manifest())?;
            let mut given = Vec::with_capacity(wanted.len());
            for d in wanted {
                match tensors.get(&d.name) {
                    Some(t) => given.push(Ok(t.clone())),
                    None => bail!(
                        "internal error: no weight `{}` for {} (a kiln bug; please report it)",
                        d.name,
                        art.dir().display()
                    ),
                }
            }
            Ok(CpuModel::load(art, given, &options)?)
        };
    let by_name = |list: Vec<HostTensor>| -> HashMap<String, HostTensor> {
        list.into_iter().map(|t| (t.name.clone(), t)).collect()
    };
    let mut reference = load(&policy_art, &by_name(initial.clone()))?;
    let mut current = by_name(resumed.unwrap_or(initial));
    let mut trainer = CompiledTrainer::new(load(&train_art, &current)?)?;
    if let Some(dir) = req.resume {
        // AdamW's moments and step count (and a bf16 model's master weights).
        let opt = weights::open_checkpoint(&dir.join(OPTIMIZER))?;
        for t in trainer.states()? {
            let saved = opt.get(&t.name).map(|_| opt.read(&t.name)).transpose()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no `{}`: not a checkpoint of this train step (give the run's optimizer settings)",
                    dir.join(OPTIMIZER).display(),
                    t.name
                )
            })?;
            if saved.shape != t.shape || saved.dtype != t.dtype {
                bail!(
                    "{}: `{}` is {:?} {:?}, and this run's train step keeps {:?} {:?}",
                    dir.join(OPTIMIZER).display(),
                    t.name,
                    saved.dtype,
                    saved.shape,
                    t.dtype,
                    t.shape
                );
            }
            trainer.set_state(saved)?;
        }
    }
    let names: Vec<String> = rewards.iter().map(|r| r.name()).collect();
    writeln!(
        out,
        "grpo {}: {} steps of {} prompts x {} completions from {} (temperature {}, up to {} new tokens), rewards {}, \
         kl {beta}, clip {clip}, lr {}, {} update(s) per step",
        spec.model.name,
        req.steps,
        req.prompts_per_step,
        req.group,
        req.prompts.display(),
        req.temperature,
        req.max_new_tokens,
        names.join(" + "),
        req.lr,
        req.updates
    )?;
    let metrics_path = req.out.join(METRICS);
    let mut metrics = open_metrics(&metrics_path, progress.step)?;
    if let Some(dir) = req.resume {
        writeln!(out, "resumed from {} at step {}", dir.display(), progress.step)?;
        if progress.step >= req.steps {
            writeln!(out, "the run has taken its {} steps already (--steps {})", progress.step, req.steps)?;
        }
    }
    for step in progress.step..req.steps {
        let t_step = Instant::now();
        let batch: Vec<&Prompt> = (0..req.prompts_per_step)
            .map(|j| &prompts[(step as usize * req.prompts_per_step + j) % prompts.len()])
            .collect();
        // 1. Sample.
        let mut policy = load(&policy_art, &current)?;
        let inputs: Vec<Vec<i64>> =
            batch.iter().flat_map(|p| std::iter::repeat_n(p.ids.clone(), req.group)).collect();
        let opts = GenerateOptions {
            max_new_tokens: req.max_new_tokens,
            sampling: Sampling::Sample {
                temperature: req.temperature,
                top_p: req.top_p,
                seed: req.seed.wrapping_add(step),
            },
            stop_tokens: eos.into_iter().collect(),
        };
        let gen = generate(&mut policy, &inputs, &opts, &mut |_| {})?;
        // 2. Reward.
        let mut per_reward = vec![0.0; rewards.len()];
        let mut total = Vec::with_capacity(inputs.len());
        for (s, toks) in gen.tokens.iter().enumerate() {
            let body = match (gen.stopped[s], toks.last()) {
                (true, Some(&last)) if Some(last) == eos => &toks[..toks.len() - 1],
                _ => &toks[..],
            };
            let text = tok.decode(body)?;
            let answer = &batch[s / req.group].answer;
            let mut r = 0.0;
            for (k, rw) in rewards.iter().enumerate() {
                let v = rw.score(&text, answer, gen.stopped[s]);
                per_reward[k] += v / inputs.len() as f64;
                r += v;
            }
            total.push(r);
        }
        let adv = objective::advantages(&total, req.group);
        // 3. Log-probabilities of every completion token under the sampling and reference models.
        let pad = eos.unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows * width);
        let mut spans = Vec::with_capacity(rows);
        for (s, p) in inputs.iter().enumerate() {
            let c = &gen.tokens[s];
            tokens.extend_from_slice(p);
            tokens.extend_from_slice(c);
            tokens.extend(std::iter::repeat_n(pad, width - p.len() - c.len()));
            // Targets at positions p-1 .. p+c-1 predict the completion's tokens.
            spans.push((p.len() - 1, c.len()));
        }
        let rows_now = TokenRows::from_rows(width, tokens)?;
        let logp_of = |engine: &mut CpuModel| -> Result<Vec<Vec<f64>>> {
            let sc = kiln_runtime::score::score(engine, &rows_now, rows)?;
            let t = width - 1;
            Ok(spans
                .iter()
                .enumerate()
                .map(|(s, &(from, n))| {
                    (from..from + n).map(|i| -f64::from(sc.token_loss[s * t + i])).collect()
                })
                .collect())
        };
        let old = logp_of(&mut policy)?;
        let refp = logp_of(&mut reference)?;
        // 4. Update.
        let mut first = None;
        let mut grad_norm = f32::NAN;
        for u in 0..req.updates {
            let logp = if u == 0 { old.clone() } else { logp_of(&mut load(&policy_art, &current)?)? };
            let comps: Vec<Completion> = (0..rows)
                .map(|s| Completion { logp: &logp[s], old: &old[s], reference: &refp[s], advantage: adv[s] })
                .collect();
            let e = req.objective.evaluate(&comps);
            let t = width - 1;
            let scale = (rows * t) as f64;
            let mut w = vec![0f32; rows * t];
            for (s, &(from, n)) in spans.iter().enumerate() {
                for k in 0..n {
                    w[s * t + from + k] = (-scale * e.grad[s][k]) as f32;
                }
            }
            let stats = trainer.step(&rows_now.clone().with_weights(w)?, req.lr as f32)?;
            grad_norm = stats.grad_norm;
            first.get_or_insert(e);
            for t in trainer.weights()? {
                current.insert(t.name.clone(), t);
            }
        }
        let e = first.expect("at least one update");
        let reward = total.iter().sum::<f64>() / total.len() as f64;
        let length = gen.tokens.iter().map(Vec::len).sum::<usize>() as f64 / rows as f64;
        let shown: Vec<String> = names.iter().zip(&per_reward).map(|(n, v)| format!("{n} {v:.3}")).collect();
        writeln!(
            out,
            "step {:>4}  reward {reward:.3} ({})  loss {:.5}  kl {:.5}  clipped {:.3}  grad norm {grad_norm:.4}  \
             {length:.1} tokens/completion  {:.1} s",
            step + 1,
            shown.join(", "),
            e.loss,
            e.kl,
            e.clipped,
            t_step.elapsed().as_secs_f64()
        )?;
        let by_name: serde_json::Map<String, Value> =
            names.iter().zip(&per_reward).map(|(n, v)| (n.clone(), Value::from(*v))).collect();
        let line = serde_json::json!({
            "step": step + 1, "reward": reward, "rewards": by_name, "loss": e.loss, "kl": e.kl,
            "clipped": e.clipped, "grad_norm": grad_norm, "lr": req.lr, "completion_tokens": length,
        });
        writeln!(metrics, "{line}")?;
        let last = step + 1 == req.steps;
        if last || req.save_every.is_some_and(|k| k > 0 && (step + 1) % k == 0) {
            progress.step = step + 1;
            let dir = save(req.out, &progress, &spec, &current, &trainer.states()?, &folder)?;
            writeln!(out, "saved {}", dir.display())?;
        }
    }
    drop(metrics);
    let (page, _, _) = crate::report::write(&crate::report::Request::of(req.out))?;
    writeln!(out, "report: {}", page.display())?;
    Ok(())
}

/// `--tokenizer`, else the model's folder, else the weights'.
fn tokenizer_folder(req: &Request) -> Result<PathBuf> {
    let weights = match &req.weights {
        Weights::Checkpoint(dir) => Some(*dir),
        Weights::Random(_) => None,
    };
    match crate::tokenize::text_folder(req.tokenizer, req.model, weights) {
        Some(dir) => Ok(dir),
        None => bail!(
            "kiln grpo reads prompts and completions as text: give the model's tokenizer with --tokenizer DIR \
             (or a Hugging Face folder that holds one)"
        ),
    }
}

/// The prompts of a JSONL file, each encoded: a `prompt` as text (with the tokenizer's special
/// tokens), or `messages` rendered by the chat template with the assistant's turn opened.
fn load_prompts(path: &Path, tok: &TextTokenizer, folder: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut template: Option<ChatTemplate> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let answer = match v.get("answer") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => bail!("{}: field \"answer\" must be a string, found {other}", at()),
            None => {
                bail!("{}: no \"answer\" field (each line is {{\"prompt\": ..., \"answer\": ...}})", at())
            }
        };
        let ids = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(p)), None) => tok.encode(p)?,
            (None, Some(Value::Array(list))) => {
                let mut messages = Vec::with_capacity(list.len());
                for (j, m) in list.iter().enumerate() {
                    let field = |name: &str| match m.get(name) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        _ => Err(anyhow::anyhow!("{}: messages[{j}].{name} must be a string", at())),
                    };
                    messages.push(Message::new(&field("role")?, &field("content")?));
                }
                if template.is_none() {
                    template = Some(template::load(folder)?);
                }
                let t = template.as_ref().expect("just loaded");
                tok.encode_plain(&t.render(&messages, true).with_context(at)?)?
            }
            (Some(_), Some(_)) => bail!("{}: give \"prompt\" or \"messages\", not both", at()),
            (Some(other), None) => bail!("{}: field \"prompt\" must be a string, found {other}", at()),
            (None, Some(other)) => bail!("{}: field \"messages\" must be a list, found {other}", at()),
            (None, None) => bail!("{}: no \"prompt\" (text) or \"messages\" (a conversation) field", at()),
        };
        if ids.is_empty() {
            bail!("{}: the prompt encodes to no tokens", at());
        }
        out.push(Prompt { ids, answer });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// `metrics.jsonl`: a fresh one, or a resumed run's with the lines of its first `step` steps alone
/// (a run resumed from an earlier checkpoint than its last drops the steps it takes again),
/// rewritten atomically, then appended to.
fn open_metrics(path: &Path, step: u64) -> Result<std::fs::File> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    if step == 0 {
        return std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()));
    }
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::new();
    for line in old.lines() {
        // A line a kill cut short parses as nothing, and goes.
        let at = serde_json::from_str::<Value>(line).ok().and_then(|v| v["step"].as_u64());
        if at.is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kiln_ir::output::write_file(path, kept.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    open(path)
}

/// Writes `out/step-N/`: the model as a Hugging Face folder with its tokenizer files, AdamW's
/// state and the run's position, into a hidden folder renamed into place.
fn save(
    out: &Path,
    progress: &Progress,
    spec: &kiln_ir::ModelSpec,
    weights: &HashMap<String, HostTensor>,
    states: &[HostTensor],
    tokenizer: &Path,
) -> Result<PathBuf> {
    let step = progress.step;
    let dir = out.join(format!("step-{step}"));
    let tmp = out.join(format!(".step-{step}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut tensors: Vec<HostTensor> = weights.values().cloned().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&spec::to_hf_config(spec))? + "\n")?;
    weights::write_safetensors(&tmp.join("model.safetensors"), &tensors, StoreFloats::AsDeclared)?;
    let mut states = states.to_vec();
    states.sort_by(|a, b| a.name.cmp(&b.name));
    weights::write_safetensors(&tmp.join(OPTIMIZER), &states, StoreFloats::AsDeclared)?;
    std::fs::write(tmp.join(PROGRESS), serde_json::to_string_pretty(progress)? + "\n")?;
    crate::train::copy_tokenizer(Some(tokenizer), &tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot write {}", dir.display()))?;
    Ok(dir)
}
