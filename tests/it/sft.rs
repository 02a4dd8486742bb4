//! Supervised fine-tuning: the token-weighted loss of the train step, and `kiln sft` end to end on
//! a Hugging Face folder of models/tiny.toml (random weights, seed 3) with the fixture tokenizer
//! and DeepSeek-V3's chat template.

use std::collections::HashMap;
use std::path::Path;

use kiln_compiler::build::{self, TrainLosses};
use kiln_compiler::train::{program, Optimizer};
use kiln_ir::interp::Tensor;
use kiln_runtime::data::{self, TokenFormat, TokenRows};
use kiln_runtime::reference::to_tensor;
use kiln_runtime::train::Trainer;
use kiln_runtime::weights::{self, HostTensor};
use serde_json::{json, Value};

use crate::util::{kiln, root, Scratch};

fn tiny() -> kiln_ir::ModelSpec {
    kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap()
}

fn initial(spec: &kiln_ir::ModelSpec) -> Vec<HostTensor> {
    let decls = weights::graph_params(&build::build_graph(spec).unwrap()).unwrap();
    weights::random_tensors(decls, 3, 0.02).collect()
}

/// Every target's cross-entropy under `params`, from the `score` program on the interpreter,
/// row-major.
fn token_losses(spec: &kiln_ir::ModelSpec, params: &[HostTensor], rows: &TokenRows) -> Vec<f32> {
    let g = build::build_score(spec).unwrap();
    let (n, t) = (rows.rows(), rows.width() - 1);
    let ids = |f: &dyn Fn(&[i64]) -> Vec<i64>| {
        let data: Vec<i64> = (0..n).flat_map(|r| f(rows.row(r))).collect();
        Tensor::from_i64(kiln_ir::DType::I32, vec![n as u64, t as u64], data).unwrap()
    };
    let feeds = HashMap::from([
        ("tokens".to_string(), ids(&|r| r[..t].to_vec())),
        ("targets".to_string(), ids(&|r| r[1..].to_vec())),
        ("positions".to_string(), ids(&|_| (0..t as i64).collect())),
    ]);
    let declared: Vec<String> = g.params().into_iter().map(|(n, _)| n.to_string()).collect();
    let params: HashMap<String, Tensor> = params
        .iter()
        .filter(|p| declared.contains(&p.name))
        .map(|p| (p.name.clone(), to_tensor(p.clone()).unwrap()))
        .collect();
    let out = kiln_ir::interp::run(&g, &feeds, &params).unwrap();
    out["loss"].as_f32().unwrap().to_vec()
}

/// The train step with token weights: its loss is `mean(ce * w)`, so with the mask normalised as
/// `kiln sft` does it is the mean over the kept targets; weights of 1 give exactly the unweighted
/// step (loss and updated weights).
#[test]
fn weighted_loss_is_the_mean_over_the_kept_targets() {
    let spec = tiny();
    let rows =
        data::load_tokens(&root().join("tests/goldens/train/tokens.safetensors"), &TokenFormat::Safetensors)
            .unwrap();
    let (n, t) = (rows.rows(), rows.width() - 1);
    // Keep a pseudo-random two thirds of the targets.
    let mask: Vec<f32> = (0..n * t).map(|i| if (i * 7 + 3) % 3 != 0 { 1.0 } else { 0.0 }).collect();
    let kept = mask.iter().filter(|&&m| m != 0.0).count();
    let scale = (n * t) as f32 / kept as f32;
    let weighted = rows.clone().with_weights(mask.iter().map(|m| m * scale).collect()).unwrap();
    let params = initial(&spec);
    let ce = token_losses(&spec, &params, &rows);
    let want: f64 = ce.iter().zip(&mask).map(|(&c, &m)| f64::from(c * m)).sum::<f64>() / kept as f64;
    let all: f64 = ce.iter().map(|&c| f64::from(c)).sum::<f64>() / (n * t) as f64;

    let opt = Optimizer::default();
    let losses = TrainLosses { token_weights: true, ..TrainLosses::default() };
    let p = program(&spec, &losses, &opt, false, false, None).unwrap();
    assert!(p.step.inputs().iter().any(|(name, _)| *name == build::LOSS_WEIGHTS));
    let mut trainer = Trainer::new(p.step, p.states, params.clone()).unwrap();
    let got = f64::from(trainer.step(&weighted, 1e-3).unwrap().loss);
    eprintln!("weighted loss {got} (kept-target mean {want}, every target {all})");
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    assert!((want - all).abs() > 1e-4, "the mask must change the loss for this test to mean anything");

    // Rows without weights are refused by the weighted step, and weights by the plain one.
    let e = trainer.step(&rows, 1e-3).unwrap_err().to_string();
    assert!(e.contains("carry no target weights"), "{e}");
    let plain = program(&spec, &TrainLosses::default(), &opt, false, false, None).unwrap();
    let mut plain = Trainer::new(plain.step, plain.states, params.clone()).unwrap();
    let e = plain.step(&weighted, 1e-3).unwrap_err().to_string();
    assert!(e.contains("no `loss_weights` input"), "{e}");

    // Weights of 1: the same step as the unweighted program.
    let p = program(&spec, &losses, &opt, false, false, None).unwrap();
    let mut ones = Trainer::new(p.step, p.states, params).unwrap();
    let a = ones.step(&rows.clone().with_weights(vec![1.0; n * t]).unwrap(), 1e-3).unwrap();
    let b = plain.step(&rows, 1e-3).unwrap();
    assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm));
    assert_eq!(ones.weights(), plain.weights());
}

/// A Hugging Face folder of tiny (random weights, seed 3) with the fixture tokenizer and
/// DeepSeek-V3's chat template (its special tokens the fixture's).
fn chat_folder(s: &Scratch) -> String {
    let hf = s.str("hf");
    let r = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "3", "-o", &hf]);
    assert!(r.ok, "{}", r.stderr);
    let hf_path = Path::new(&hf);
    std::fs::copy(root().join("tests/fixtures/tokenizer/tokenizer.json"), hf_path.join("tokenizer.json"))
        .unwrap();
    let v3 = root().join("tests/fixtures/chat/deepseek_v3/tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(v3).unwrap()).unwrap();
    config["bos_token"] = json!("<bos>");
    config["eos_token"] = json!({ "content": "<eos>" });
    std::fs::write(hf_path.join("tokenizer_config.json"), config.to_string()).unwrap();
    hf
}

const CHATS: [(&str, &str); 3] =
    [("what is the clay", "a pot"), ("hello kiln", "hello world"), ("the experts", "route each token")];

/// `kiln sft`: the assistant targets it counts are the tokens of each assistant turn as
/// DeepSeek-V3's template renders it (written out by hand here), its first loss is the mean
/// cross-entropy over exactly those targets, the compiled run agrees with the interpreter's, the
/// assistant turns are learned, and a malformed line is an error naming its line and field.
#[test]
fn kiln_sft_learns_the_assistant_turns_alone() {
    let s = Scratch::new();
    let hf = chat_folder(&s);
    let data = s.str("chat.jsonl");
    let lines: Vec<String> = CHATS
        .iter()
        .map(|(q, a)| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();

    // The template's text, by hand: `<bos><｜User｜>{q}<｜Assistant｜>{a}<｜end▁of▁sentence｜>`; the
    // assistant's tokens are those after the prefix that ends with `<｜Assistant｜>`.
    let tok =
        tokenizers::Tokenizer::from_file(root().join("tests/fixtures/tokenizer/tokenizer.json")).unwrap();
    let enc = |text: &str| -> Vec<i64> {
        tok.encode(text, false).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect()
    };
    let convs: Vec<(Vec<i64>, usize)> = CHATS
        .iter()
        .map(|(q, a)| {
            let before = format!("<bos><｜User｜>{q}<｜Assistant｜>");
            let full = enc(&format!("{before}{a}<｜end▁of▁sentence｜>"));
            let n = enc(&before).len();
            assert_eq!(enc(&before)[..], full[..n], "the prefix encodes as the start of the whole");
            (full, n)
        })
        .collect();
    let width = convs.iter().map(|c| c.0.len()).max().unwrap();
    let count: usize = convs.iter().map(|(ids, n)| ids.len() - n).sum();

    let out = s.str("out");
    let args = ["--batch", "3", "--steps", "20", "--lr", "0.004", "--schedule", "constant", "--threads", "1"];
    let r = kiln(&[&["sft", &hf, "--data", &data, "--out", &out], &args[..]].concat());
    assert!(r.ok, "{}", r.stderr);
    let header =
        format!("sft: 3 conversations from {data} in rows of {width} tokens, {count} assistant targets");
    assert!(r.stdout.contains(&header), "{}", r.stdout);

    // Step 1's loss: the mean over the assistant targets, from the score program.
    let eos = tiny().model.eos_token_id.unwrap() as i64;
    let tokens: Vec<i64> = convs
        .iter()
        .flat_map(|(ids, _)| ids.iter().copied().chain(std::iter::repeat(eos)).take(width))
        .collect();
    let rows = TokenRows::from_rows(width, tokens).unwrap();
    let ce = token_losses(&tiny(), &initial(&tiny()), &rows);
    let t = width - 1;
    let mut sum = 0f64;
    for (r, (ids, n)) in convs.iter().enumerate() {
        for i in 0..t {
            if i + 1 >= *n && i + 1 < ids.len() {
                sum += f64::from(ce[r * t + i]);
            }
        }
    }
    let want = sum / count as f64;
    let losses = logged(&out);
    assert_eq!(losses.len(), 20);
    let rel = (losses[0] - want).abs() / want;
    eprintln!(
        "sft step 1: loss {} vs assistant-token mean {want} ({rel:e} relative); step 12: {}",
        losses[0], losses[11]
    );
    assert!(rel <= 1e-4, "{} vs {want}", losses[0]);
    // The three answers are memorised: the loss falls by far.
    assert!(losses[19] < 0.5 * losses[0], "{losses:?}");

    // The interpreter runs the same steps.
    let out_i = s.str("out-interp");
    let interp = ["--batch", "3", "--steps", "2", "--lr", "0.004", "--schedule", "constant", "--interp"];
    let r = kiln(&[&["sft", &hf, "--data", &data, "--out", &out_i], &interp[..]].concat());
    assert!(r.ok, "{}", r.stderr);
    for (a, b) in logged(&out_i).iter().zip(&losses) {
        assert!((a - b).abs() <= 1e-4 * b, "interpreter {a} vs compiled {b}");
    }

    // Epochs: 2 epochs of 3 conversations in batches of 2 are 3 steps; the defaults are DeepSeek-V3's.
    let out_e = s.str("out-epochs");
    let r = kiln(&["sft", &hf, "--data", &data, "--out", &out_e, "--batch", "2", "--threads", "1"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("3 steps of 2 x"), "{}", r.stdout);
    assert!(r.stdout.contains("Cosine schedule, lr 0.000005"), "{}", r.stdout);

    // A malformed line names its line and field, and nothing is trained.
    std::fs::write(
        &data,
        format!("{}\n{{\"messages\": [{{\"role\": \"user\", \"content\": 7}}]}}\n", lines[0]),
    )
    .unwrap();
    let r = kiln(&["sft", &hf, "--data", &data, "--out", &s.str("bad"), "--steps", "1"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains(&format!("{data}:2")) && r.stderr.contains("messages[0].content must be a string"),
        "{}",
        r.stderr
    );
}

fn logged(dir: &str) -> Vec<f64> {
    std::fs::read_to_string(Path::new(dir).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}
