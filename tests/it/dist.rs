//! Data-parallel training over MPI: `mpirun -n 2 kiln train ... --dp 2` takes the same steps as
//! one process (the bar: per-step losses within 1e-6 relative, f32), its collectives are
//! summed where the compiled step says, and a rank that stops answering or dies ends the job with
//! a clear error instead of a hang. Run as root and oversubscribed, as CI is (2 cores).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{kernel_cache, kiln, root, Out, Scratch};

const DATA: &str = "tests/goldens/train/tokens.safetensors";
/// Every loss term and the bias rule on, so that each sum over the replicas is exercised: the
/// next-token and MTP losses, the balance loss, and the expert loads the biases move by.
const LOSSES: [&str; 6] = ["--mtp-lambda", "0.3", "--balance-alpha", "1e-4", "--bias-update-speed", "1e-3"];

/// `mpirun -n N kiln ARGS`, killed (and the test failed) if it runs past `limit`: nothing may hang.
fn mpirun(n: usize, args: &[&str], limit: Duration) -> Out {
    mpirun_with(n, args, limit, &[])
}

/// [`mpirun`] with environment variables set for every process.
fn mpirun_with(n: usize, args: &[&str], limit: Duration, env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-n", &n.to_string()]);
    cmd.args(["-x", "KILN_KERNEL_CACHE_DIR"]).env("KILN_KERNEL_CACHE_DIR", kernel_cache());
    for (k, v) in env {
        cmd.args(["-x", k]).env(k, v);
    }
    cmd.arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start mpirun ({e}): OpenMPI comes from scripts/setup.sh (`make test` runs it)")
    });
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "mpirun {args:?} ran past {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Each logged step's loss and gradient norm.
fn logged(dir: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("event").is_none())
        .map(|l| (l["loss"].as_f64().unwrap(), l["grad_norm"].as_f64().unwrap()))
        .collect()
}

/// The run's `communication` event (what its collectives and messages cost).
fn logged_communication(dir: &Path) -> serde_json::Value {
    logged_event(dir, "communication")
}

/// The last `event` line of kind `kind` in a run's log.
fn logged_event(dir: &Path, kind: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    records.rfind(|l| l["event"] == kind).unwrap_or_else(|| panic!("no `{kind}` event in {}", dir.display()))
}

/// Each logged step's router-bias statistics (mean, std, min and max of each router's bias), by
/// router, in name order.
fn logged_biases(dir: &Path) -> Vec<Vec<(String, [f64; 4])>> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let stats = |v: &serde_json::Value| ["mean", "std", "min", "max"].map(|k| v[k].as_f64().unwrap());
    records
        .filter(|l| l.get("event").is_none())
        .map(|l| {
            let biases = l["bias"].as_object().expect("the monitor's bias statistics");
            biases.iter().map(|(name, v)| (name.clone(), stats(v))).collect()
        })
        .collect()
}

fn assert_close(what: &str, a: &[(f64, f64)], b: &[(f64, f64)]) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        for (p, q) in [(x.0, y.0), (x.1, y.1)] {
            let rel = (p - q).abs() / q.abs().max(1e-12);
            assert!(rel <= 1e-6, "{what}: step {}: {p} vs {q} ({rel:e} relative)\n{a:?}\n{b:?}", i + 1);
        }
    }
}

/// A train step compiled for one micro-batch of one row, with the losses above (and with
/// `extra` flags).
fn compile(s: &Scratch, name: &str, extra: &[&str]) -> String {
    let out = s.path(name).display().to_string();
    let mut args = vec!["compile", "models/tiny.toml", "--train", "--accumulate", "--target", "cpu"];
    args.extend(["--max-batch", "1", "--max-context", "32", "-o", &out]);
    args.extend(LOSSES);
    args.extend(extra);
    let r = kiln(&args);
    assert!(r.ok, "{}", r.stderr);
    out
}

fn train_args<'a>(model: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let mut a = vec!["train", model, "--random-weights", "1", "--data", DATA, "--batch", "4"];
    a.extend(["--micro-batch", "1", "--steps", steps, "--threads", "1", "--out", out]);
    a
}

#[test]
fn two_replicas_take_the_steps_of_one_process_and_fail_loudly() {
    let s = Scratch::new();
    let plain = compile(&s, "plain.kiln", &[]);
    let dp = compile(&s, "dp.kiln", &["--data-parallel"]);
    // The sums start during the backward pass, each right after the launch that makes its
    // operand: launches run between the first and the last, in the step and in the accumulator.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&dp).join("manifest.json")).unwrap())
            .unwrap();
    for p in manifest["programs"].as_array().unwrap() {
        let steps: Vec<&str> =
            p["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
        let sums: Vec<usize> = (0..steps.len()).filter(|&i| steps[i] == "all_reduce").collect();
        if p["name"] == "accumulate" {
            assert!(sums.is_empty(), "an accumulating micro-batch sums nothing over the replicas");
            continue;
        }
        // A sum for every trained tensor, the loss and each MoE layer's load.
        assert!(sums.len() > 100, "{} sums", sums.len());
        let between = steps[sums[3]..*sums.last().unwrap()].iter().filter(|s| **s == "launch").count();
        assert!(between > 100, "{between} launches between the gradient sums: they are not started early");
    }

    // A process holds its gradients once, alone or as a replica: the last micro-batch's sums (over
    // the replicas too) are written over the accumulators, not into the arena, where all of them
    // would wait for the global norm beside the accumulators. Its arena is an earlier
    // micro-batch's, give or take a small part of the gradients.
    let program_of = |dir: &str, name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(Path::new(dir).join("manifest.json")).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        m["programs"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone()
    };
    let arena = |p: &serde_json::Value| p["arena_bytes"].as_u64().unwrap();
    let text = std::fs::read_to_string(Path::new(&plain).join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let grads: u64 = (m["states"].as_array().unwrap().iter())
        .filter(|s| s["role"] == "gradient_accumulator")
        .map(|s| s["shape"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().parse::<u64>().unwrap()))
        .map(|dims| 4 * dims.product::<u64>())
        .sum();
    for dir in [&plain, &dp] {
        let (last, earlier) = (arena(&program_of(dir, "train_step")), arena(&program_of(dir, "accumulate")));
        assert!(
            last < earlier + grads / 2,
            "{dir}: {last} bytes of arena, {earlier} before, {grads} of gradients"
        );
    }
    let step = program_of(&dp, "train_step");
    let buffers = step["buffers"].as_array().unwrap();
    let in_states = (step["steps"].as_array().unwrap().iter())
        .filter(|s| s["step"] == "all_reduce")
        .map(|s| &buffers[s["buffer"].as_u64().unwrap() as usize])
        .filter(|b| b["shape"].as_array().unwrap().len() == 2)
        .inspect(|b| assert_eq!(b["storage"]["in"], "state", "{b}"))
        .count();
    assert!(in_states > 50, "{in_states} matrices summed");

    // One process, 4 micro-batches of a row; two replicas of 2 micro-batches each; the
    // data-parallel step alone (a group of one).
    let (one, two, alone) = (s.path("one"), s.path("two"), s.path("alone"));
    let (one, two, alone) = (one.to_str().unwrap(), two.to_str().unwrap(), alone.to_str().unwrap());
    let r = kiln(&train_args(&plain, one, "4"));
    assert!(r.ok, "{}", r.stderr);
    let mut args = train_args(&dp, two, "4");
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("data-parallel over 2 processes (MPI), 1 rows each"), "{}", r.stdout);
    // Rank 0 alone speaks and writes.
    assert_eq!(r.stdout.matches("step     4").count(), 1, "{}", r.stdout);
    // What the sums cost: several messages a step, and the share not waited for, a fraction.
    let comm = r.stdout.lines().find(|l| l.starts_with("communication: ")).expect("a communication line");
    let messages: u64 = comm["communication: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(messages > 4 * 4, "{comm}");
    let hidden: f64 = comm.rsplit(": ").next().unwrap().split('%').next().unwrap().parse().unwrap();
    assert!((0.0..=100.0).contains(&hidden), "{comm}");
    let r = kiln(&train_args(&dp, alone, "4"));
    assert!(r.ok, "{}", r.stderr);

    let reference = logged(Path::new(one));
    assert_eq!(reference.len(), 4);
    assert_close("two replicas", &logged(Path::new(two)), &reference);
    assert_close("the data-parallel step alone", &logged(Path::new(alone)), &reference);
    // The biases move by whole-token loads, the same sums in any order: bit-identical.
    let bias = |dir: &str| {
        let t =
            kiln_runtime::weights::open_checkpoint(&Path::new(dir).join("step-4/model.safetensors")).unwrap();
        let name = "model.layers.1.mlp.gate.e_score_correction_bias";
        t.read(name).unwrap().data
    };
    assert_eq!(bias(two), bias(one));

    // Two steps, then a resume under mpirun to four: the weights of four straight steps, bit for bit.
    let half = s.path("half").display().to_string();
    let mut args = train_args(&dp, &half, "2");
    args.extend(["--dp", "2"]);
    assert!(mpirun(2, &args, Duration::from_secs(300)).ok);
    let from = format!("{half}/step-2");
    let mut args = train_args(&dp, &half, "4");
    args.splice(2..4, ["--resume", from.as_str()]);
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let bytes = |dir: &str| std::fs::read(Path::new(dir).join("step-4/model.safetensors")).unwrap();
    assert!(bytes(&half) == bytes(two), "a resumed data-parallel run differs from an uninterrupted one");

    // ZeRO-1: AdamW's states split over the two replicas. Each keeps half of them, and the run is
    // the unsplit one bit for bit: the same weights and, gathered whole into the checkpoint, the
    // same moments; a resume splits them again.
    let zero = compile(&s, "zero.kiln", &["--zero1", "2"]);
    // The split update makes each shard from the shards of what it reads, and gathers it as soon
    // as it is updated: the arena holds no whole scaled gradient and no run of updated shards
    // waiting for one message, so it is the unsplit step's (to a few kB of shard bookkeeping).
    let (split, unsplit) = (arena(&program_of(&zero, "train_step")), arena(&program_of(&dp, "train_step")));
    assert!(split <= unsplit + unsplit / 100, "ZeRO-1's step: {split} bytes of arena against {unsplit}");
    let (z4, z2) = (s.path("z4").display().to_string(), s.path("z2").display().to_string());
    let mut args = train_args(&zero, &z4, "4");
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let per_process = |out: &str| -> f64 {
        let at = out.find("AdamW's states ").expect("the states' size") + "AdamW's states ".len();
        out[at..].split(' ').next().unwrap().parse().unwrap()
    };
    assert!(r.stdout.contains("(split over the replicas: ZeRO-1)"), "{}", r.stdout);
    let mut args = train_args(&dp, &s.path("unsplit").display().to_string(), "1")
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>();
    args.extend(["--dp".into(), "2".into()]);
    let unsplit = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(300));
    assert!(unsplit.ok, "{}", unsplit.stderr);
    // Half, up to the padding of tensors of an odd size and the rounding of the printed MB.
    let ratio = per_process(&r.stdout) / per_process(&unsplit.stdout);
    assert!((0.49..=0.51).contains(&ratio), "{ratio}\n{}\n{}", r.stdout, unsplit.stdout);
    assert_close("ZeRO-1", &logged(Path::new(&z4)), &reference);
    let file = |dir: &str, f: &str| std::fs::read(Path::new(dir).join("step-4").join(f)).unwrap();
    assert!(file(&z4, "model.safetensors") == file(two, "model.safetensors"));
    assert!(file(&z4, "optimizer.safetensors") == file(two, "optimizer.safetensors"));
    let mut args = train_args(&zero, &z2, "2");
    args.extend(["--dp", "2"]);
    assert!(mpirun(2, &args, Duration::from_secs(300)).ok);
    let from = format!("{z2}/step-2");
    let mut args = train_args(&zero, &z2, "4");
    args.splice(2..4, ["--resume", from.as_str()]);
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(file(&z2, "model.safetensors") == file(two, "model.safetensors"), "a resumed ZeRO-1 run differs");
    // Alone, a split step has no replicas to gather from.
    let r = kiln(&train_args(&zero, &s.path("alone-zero").display().to_string(), "1"));
    assert!(!r.ok);
    assert!(r.stderr.contains("the program gathers from 2 processes and this run has 1"), "{}", r.stderr);

    // A peer that never answers: rank 0 gives up after --comm-timeout and ends the job.
    let stall = s.path("stall").display().to_string();
    let mut args = train_args(&dp, &stall, "3");
    args.extend(["--dp", "2", "--comm-timeout", "2", "--inject-fault", "stall:1@2"]);
    let r = mpirun(2, &args, Duration::from_secs(120));
    assert!(!r.ok);
    assert!(
        r.stderr.contains("error: rank 0 of 2 waited 2 s for the other ranks in the all-reduce of"),
        "{}",
        r.stderr
    );
    // A checkpoint that takes longer than --comm-timeout to write (rank 0 sleeps 3 s before it
    // writes step 2's, with a 1 s timeout): the other replica waits for it, bounded by the
    // checkpoint wait, and the run goes on.
    let slow = s.path("slow").display().to_string();
    let mut args = train_args(&dp, &slow, "3");
    args.extend(["--dp", "2", "--save-every", "2", "--comm-timeout", "1", "--inject-fault", "slow-save:3@2"]);
    let r = mpirun(2, &args, Duration::from_secs(120));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("saved") && Path::new(&slow).join("step-3").is_dir(), "{}", r.stdout);
    let mut args = train_args(&plain, &slow, "3");
    args.extend(["--inject-fault", "slow-save:3@1"]);
    let r = kiln(&args);
    assert!(!r.ok && r.stderr.contains("step 1 writes no checkpoint"), "{}", r.stderr);
    // A rank that dies: mpirun ends the others.
    let dead = s.path("dead").display().to_string();
    let mut args = train_args(&dp, &dead, "3");
    args.extend(["--dp", "2", "--inject-fault", "exit:1@2"]);
    let r = mpirun(2, &args, Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("rank 1: exiting before step 2"), "{}", r.stderr);

    // Mistakes are refused before any step, naming the fix.
    let mut args = train_args(&plain, two, "1");
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("compile it with `kiln compile --train --data-parallel`"), "{}", r.stderr);
    // Whichever rank fails first says so and ends the job.
    assert!(r.stderr.contains(" of 2; ending every process of the job)"), "{}", r.stderr);
    let r = mpirun(2, &[&args[..args.len() - 1], &["3"]].concat(), Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("--dp 3: mpirun started 2 processes; start 3 (`mpirun -n 3`)"), "{}", r.stderr);
    let r = kiln(&args);
    assert!(!r.ok);
    assert!(r.stderr.contains("launch them with `mpirun -n 2 kiln train ... --dp 2`"), "{}", r.stderr);
    let mut args = train_args(&dp, two, "1");
    args[7] = "3";
    args.extend(["--dp", "2"]);
    let r = mpirun(2, &args, Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("--batch 3 cannot be shared by the 2 processes"), "{}", r.stderr);
}

/// `kiln sft --dp 2`: each batch's loss weights are normalised over the whole batch's assistant
/// targets before the replicas take their rows, so two replicas take the steps of one process.
#[test]
fn supervised_fine_tuning_over_two_replicas_matches_one_process() {
    // The doctor names the MPI library kiln links and the mpirun it would launch with.
    let r = kiln(&["doctor"]);
    assert!(r.ok, "{}", r.stderr);
    let mpi = r.stdout.lines().find(|l| l.starts_with("MPI ")).expect("an MPI line");
    assert!(mpi.contains("Open MPI v") && mpi.contains("mpirun at "), "{mpi}");
    // And NCCL's version, or why it cannot be loaded.
    let nccl = r.stdout.lines().find(|l| l.starts_with("NCCL ")).expect("an NCCL line");
    match kiln_runtime::gpu::nccl::present() {
        true => assert!(nccl.contains("NCCL        2.") && nccl.contains("--nccl"), "{nccl}"),
        false => assert!(nccl.contains("unavailable") && nccl.contains("libnccl.so.2"), "{nccl}"),
    }

    let s = Scratch::new();
    let hf = crate::grpo::tiny_chat(&s);
    let (one, two) = (s.path("one").display().to_string(), s.path("two").display().to_string());
    let args = |out: &str| -> Vec<String> {
        let a = ["sft", &hf, "--data", "tests/fixtures/chat/arith.jsonl", "--batch", "4", "--steps", "3"];
        let b = ["--lr", "0.003", "--threads", "1", "--out", out];
        a.iter().chain(&b).map(|x| x.to_string()).collect()
    };
    let single = args(&one);
    let r = kiln(&single.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.ok, "{}", r.stderr);
    let mut dp = args(&two);
    dp.extend(["--dp".into(), "2".into()]);
    let r = mpirun(2, &dp.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("data-parallel over 2 processes (MPI), 2 rows each"), "{}", r.stdout);
    let reference = logged(Path::new(&one));
    assert_eq!(reference.len(), 3);
    assert_close("sft over two replicas", &logged(Path::new(&two)), &reference);
}

/// A bf16 model trains on f32 master weights; ZeRO-1 splits the masters too, and each replica
/// starts its shard from its own part of the weights: the run is the unsplit one bit for bit.
#[test]
fn split_master_weights_of_a_bf16_model_equal_the_unsplit_run() {
    let s = Scratch::new();
    let spec = std::fs::read_to_string(root().join("models/tiny.toml")).unwrap();
    assert!(spec.contains("dtype = \"f32\""));
    let bf16 = s.path("tiny_bf16.toml");
    std::fs::write(&bf16, spec.replacen("dtype = \"f32\"", "dtype = \"bf16\"", 1)).unwrap();
    let bf16 = bf16.display().to_string();
    let run = |out: &str, zero: bool, ep: bool| -> Out {
        let mut args = train_args(&bf16, out, "3");
        args.extend(["--dp", "2", "--no-monitor"]);
        if ep {
            args.extend(["--ep", "2"]);
        }
        if zero {
            args.push("--zero1");
        }
        mpirun(if ep { 4 } else { 2 }, &args, Duration::from_secs(300))
    };
    // Also under expert parallelism (--ep 2 --dp 2): a routed expert's master is split over the
    // two processes that hold the expert, the others' over all four.
    for ep in [false, true] {
        let name = |what: &str| s.path(&format!("{what}-{ep}")).display().to_string();
        let (plain, split) = (name("plain"), name("split"));
        for (out, zero) in [(&plain, false), (&split, true)] {
            let r = run(out, zero, ep);
            assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
        }
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let read = |dir: &str| std::fs::read(Path::new(dir).join("step-3").join(f)).unwrap();
            assert!(
                read(&plain) == read(&split),
                "--ep {ep}: {f} differs between the split and the unsplit run"
            );
        }
    }
    let split = s.path("split-false").display().to_string();
    // The masters are in the optimizer's checkpoint, whole.
    let opt = kiln_runtime::weights::open_checkpoint(&Path::new(&split).join("step-3/optimizer.safetensors"))
        .unwrap();
    let master = opt.read("master.model.embed_tokens.weight").unwrap();
    assert_eq!(master.shape, vec![512, 64]);
}

/// `kiln train --pp N` under `mpirun -n N`: the stage programs, run in the order of each schedule
/// (1F1B, ZB1P, DualPipe with its two directions and the partner ranks' gradients summed,
/// DualPipeV's V), with activations and gradients sent over MPI, take the one-process steps of the same
/// micro-batches (every loss term and the bias rule on: balance terms cross stages, and the MTP
/// module on the last stage reads the first stage's embedding), and what the pipeline cannot run
/// yet is refused by name.
#[test]
fn pipeline_ranks_take_the_steps_of_one_process() {
    let s = Scratch::new();
    // tiny, and tiny with 8 layers: DualPipeV on 4 ranks cuts 8 stages.
    let tiny8 = s.path("tiny8.toml");
    let text = std::fs::read_to_string(root().join("models/tiny.toml")).unwrap();
    std::fs::write(&tiny8, text.replace("num_hidden_layers = 4", "num_hidden_layers = 8")).unwrap();
    let tiny8 = tiny8.display().to_string();
    // 16 rows of 33 token ids, a u16 stream.
    let data = s.path("data.bin");
    let mut x = 12345u32;
    let ids: Vec<u8> = (0..16 * 33)
        .flat_map(|_| {
            {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (2 + (x >> 16) % 510) as u16
            }
            .to_le_bytes()
        })
        .collect();
    std::fs::write(&data, ids).unwrap();
    let data = data.display().to_string();
    let run = |model: &str, batch: &str, out: &str, extra: &[&str]| {
        let mut a = vec!["train", model, "--random-weights", "1", "--data", &data, "--dtype", "u16"];
        a.extend(["--seq-len", "32", "--batch", batch]);
        a.extend(["--micro-batch", "1", "--steps", "3", "--threads", "1", "--out", out]);
        a.extend(LOSSES);
        a.extend(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let mut expected = HashMap::new();
    for (model, batch) in [("models/tiny.toml", "4"), (tiny8.as_str(), "8"), (tiny8.as_str(), "16")] {
        let one = s.path(&format!("one-{batch}")).display().to_string();
        let args = run(model, batch, &one, &[]);
        let r = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(r.ok, "{}", r.stderr);
        expected.insert(batch, (logged(Path::new(&one)), one));
    }
    // (model, batch, --pp, schedule, --dp, --zero1, --ep). The seventh run is two expert-parallel
    // pipelines of DualPipe, each with half of every MoE layer's experts on each of its ranks
    // (--ep 2; the tokens exchanged inside each stage). The eighth is two replicas of a two-rank
    // 1F1B pipeline, their states whole: the first replica streams the checkpoint. The ninth is
    // two replicas of a two-rank DualPipe, each taking half of every batch as its 4
    // micro-batches; the partner ranks sum their copies, the replicas their accumulators, and
    // each replica keeps half of AdamW's states (--zero1), which the first replica's ranks make
    // whole one at a time with the other's as they stream the checkpoint. The last
    // is all three (eight processes): two replicas of the seventh, with
    // the replicated weights' AdamW states split over the four processes of a stage and each
    // expert's over the two that hold it.
    let schedules = [
        ("models/tiny.toml", "4", "2", "1f1b", 1, false, 1),
        ("models/tiny.toml", "4", "2", "zb1p", 1, false, 1),
        ("models/tiny.toml", "4", "2", "dualpipe", 1, false, 1),
        ("models/tiny.toml", "4", "2", "dualpipev", 1, false, 1),
        (tiny8.as_str(), "8", "4", "dualpipe", 1, false, 1),
        (tiny8.as_str(), "8", "4", "dualpipev", 1, false, 1),
        (tiny8.as_str(), "8", "2", "dualpipe", 1, false, 2),
        (tiny8.as_str(), "8", "2", "1f1b", 2, false, 1),
        (tiny8.as_str(), "8", "2", "dualpipe", 2, true, 1),
        (tiny8.as_str(), "16", "2", "dualpipe", 2, true, 2),
    ];
    for (model, batch, n, schedule, dp, zero1, ep) in schedules {
        let (expected, one) = &expected[batch];
        let out = s.path(&format!("pp{n}-dp{dp}-ep{ep}-{schedule}{}", if zero1 { "-zero1" } else { "" }));
        let out = out.display().to_string();
        let trace = format!("{out}.json");
        let (dp_flag, ep_flag) = (dp.to_string(), ep.to_string());
        let mut extra = vec!["--pp", n, "--pp-schedule", schedule, "--pp-trace", &trace];
        if dp > 1 {
            extra.extend(["--dp", &dp_flag]);
        }
        if ep > 1 {
            extra.extend(["--ep", &ep_flag]);
        }
        if zero1 {
            extra.push("--zero1");
        }
        let args = run(model, batch, &out, &extra);
        let r = mpirun(
            n.parse::<usize>().unwrap() * dp * ep,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            Duration::from_secs(300),
        );
        assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
        if ep > 1 {
            assert!(r.stdout.contains("expert-parallel rank 0 of 2 (experts 0..8"), "{}", r.stdout);
        }
        let micro_batches = batch.parse::<usize>().unwrap() / dp / ep;
        assert!(
            r.stdout.contains(&format!(
                "pipeline rank 0 of {n} ({schedule} schedule, {micro_batches} micro-batches"
            )),
            "{}",
            r.stdout
        );
        if dp > 1 {
            assert!(r.stdout.contains("replica 0 of 2 (data-parallel)"), "{}", r.stdout);
        }
        // Rank 0 allocated its own stages' states alone: "H of the model's W MB of states".
        let line = r.stdout.lines().find(|l| l.contains("of the model's")).expect("the states rank 0 holds");
        let words: Vec<&str> = line.split(" of the model's ").collect();
        let held: f64 = words[0].rsplit(", ").next().unwrap().parse().unwrap();
        let whole: f64 = words[1].split(' ').next().unwrap().parse().unwrap();
        // (DualPipe on two ranks holds both stages on each, the whole model twice over.)
        let both = schedule == "dualpipe" && n == "2";
        assert!(held > 0.0 && (held < whole || both && held == whole), "{line}");
        assert_eq!(r.stdout.matches("step     3").count(), 1, "{}", r.stdout);
        // The last step's measured timeline: every compute step of every rank's list, in order on
        // each rank, and its drawing; and the share of the messages' time in flight not waited for.
        let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        let events: Vec<&serde_json::Value> =
            t["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
        for rank in 0..n.parse::<u64>().unwrap() {
            let mine: Vec<&&serde_json::Value> = events.iter().filter(|e| e["pid"] == rank).collect();
            assert!(mine.len() >= 4, "rank {rank}: {} steps", mine.len());
            for w in mine.windows(2) {
                let end = w[0]["ts"].as_f64().unwrap() + w[0]["dur"].as_f64().unwrap();
                assert!(w[1]["ts"].as_f64().unwrap() >= end - 1e-9, "rank {rank}: steps overlap: {w:?}");
            }
        }
        assert!(std::fs::read_to_string(format!("{out}.svg"))
            .unwrap()
            .contains(&format!("{schedule}, measured")));
        let comm = r.stdout.lines().find(|l| l.starts_with("communication: ")).expect("a communication line");
        let hidden: f64 = comm.rsplit(": ").next().unwrap().split('%').next().unwrap().parse().unwrap();
        assert!((0.0..=100.0).contains(&hidden), "{comm}");
        assert_close(&format!("--pp {n} {schedule}"), &logged(Path::new(&out)), expected);
        // The monitor's pre-step copies must fit beside every process of the machine: it counted
        // the states of all of them (DualPipe's ranks hold each stage twice, the replicas the
        // model once each; every process keeps its own scalars, such as AdamW's step count).
        if !zero1 && ep == 1 {
            let copies =
                |dir: &str| logged_event(Path::new(dir), "monitor_copies")["state_bytes"].as_u64().unwrap();
            let twice = if schedule == "dualpipe" { 2 } else { 1 };
            let (got, want) = (copies(&out), copies(one) * twice * dp as u64);
            let processes = n.parse::<u64>().unwrap() * dp as u64;
            assert!(
                want <= got && got <= want + 16 * processes,
                "--pp {n} {schedule} --dp {dp}: {got} vs {want}"
            );
        }
        let manifest: kiln_ir::artifact::Manifest = serde_json::from_str(
            &std::fs::read_to_string(Path::new(&out).join("train.kiln/manifest.json")).unwrap(),
        )
        .unwrap();
        // No program of a pipeline rank holds its gradients over again in the arena. An update
        // reads a copy of each accumulator's `1 / M` scaling where the global norm read one, and
        // with --dp writes the replicas' sums over the accumulators: its arena is a small part of
        // the gradients it reads (tiny8's stages, where no gradient is most of the rest); under
        // --zero1 too, where each updated shard is gathered as soon as it is made.
        if model == tiny8 && ep == 1 {
            for p in manifest.programs.iter().filter(|p| p.name.starts_with("rank.")) {
                let grads: u64 = (p.inputs.iter().filter(|i| i.name.starts_with("grad.acc.")))
                    .map(|i| p.buffers[i.buffer.index()].max_bytes)
                    .sum();
                assert!(
                    p.arena_bytes < grads / 2,
                    "{schedule}: {} has {} bytes of arena for {grads} bytes of gradients",
                    p.name,
                    p.arena_bytes
                );
            }
        }
        // A weight-gradient program adds each gradient to its accumulator as soon as it is made:
        // at no step do half of the stage's gradients wait for their accumulators (every one of
        // them did, when the updates ran last).
        for p in manifest.programs.iter().filter(|p| p.name.ends_with(".weight")) {
            use kiln_ir::artifact::{BufferKind, Step};
            let acc: HashSet<_> =
                p.outputs.iter().filter(|o| o.name.starts_with("grad.acc.")).map(|o| o.buffer).collect();
            let launches: Vec<&Vec<_>> = (p.steps.iter())
                .filter_map(|s| match s {
                    Step::Launch { buffers, .. } => Some(buffers),
                    _ => None,
                })
                .collect();
            let mut made = HashMap::new();
            for (i, buffers) in launches.iter().enumerate() {
                for b in buffers.iter() {
                    made.entry(*b).or_insert(i);
                }
            }
            // (made at, read at, bytes) of each gradient an accumulator's update reads.
            let mut waiting = Vec::new();
            for (i, buffers) in launches.iter().enumerate() {
                let Some(out) = buffers.iter().find(|b| acc.contains(b)) else { continue };
                // The gradient: an intermediate value of the accumulator's shape (not an activation
                // a fused weight-gradient GEMM reads).
                let out = &p.buffers[out.index()];
                for b in buffers.iter() {
                    let buf = &p.buffers[b.index()];
                    if buf.kind == BufferKind::Activation && buf.shape == out.shape {
                        waiting.push((made[b], i, buf.max_bytes));
                    }
                }
            }
            let at = |t: usize| waiting.iter().filter(|w| w.0 <= t && t <= w.1).map(|w| w.2).sum::<u64>();
            let most = (0..launches.len()).map(at).max().unwrap_or(0);
            let all: u64 = p
                .outputs
                .iter()
                .filter(|o| acc.contains(&o.buffer))
                .map(|o| p.buffers[o.buffer.index()].max_bytes)
                .sum();
            assert!(
                most <= all / 2,
                "{schedule}: {} holds {most} bytes of its {all} bytes of gradients waiting at once",
                p.name
            );
        }
        // DualPipe's pairs run a forward and a backward interleaved: every backward-for-inputs
        // program lies in the arena after every forward program (other schedules share it).
        let arena = |suffix: &str| -> Vec<(u64, u64)> {
            (manifest.programs.iter().filter(|p| p.name.starts_with("stage.") && p.name.ends_with(suffix)))
                .map(|p| {
                    let offsets = p.buffers.iter().filter_map(|b| match b.storage {
                        kiln_ir::artifact::Storage::Arena { offset } => Some(offset),
                        _ => None,
                    });
                    (offsets.min().unwrap(), p.arena_bytes)
                })
                .collect()
        };
        let forward_end = arena(".forward").iter().map(|a| a.1).max().unwrap();
        let backward_start = arena(".backward").iter().map(|a| a.0).min().unwrap();
        assert_eq!(backward_start >= forward_end, schedule.starts_with("dualpipe"), "{schedule}");
        if ep > 1 && dp == 1 {
            // The pairs' all-to-alls interleaved with the other program's launches, or, with
            // KILN_NO_OVERLAP_PAIRS=1, one program after the other: the same floats either way.
            let c = logged_communication(Path::new(&out));
            assert!(c["exchanges"].as_u64().unwrap() > 0, "{c}");
            let apart = format!("{out}-apart");
            let mut args = run(model, batch, &apart, &extra);
            args[1] = Path::new(&out).join("train.kiln").display().to_string();
            let r = mpirun_with(
                n.parse::<usize>().unwrap() * dp * ep,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                Duration::from_secs(300),
                &[("KILN_NO_OVERLAP_PAIRS", "1")],
            );
            assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
            assert_eq!(logged(Path::new(&apart)), logged(Path::new(&out)));
        }
        // Every stage's biases reach rank 0's monitor as their ranks moved them: the same load
        // counts move them by the same ±γ steps as in one process.
        let (ours, theirs) = (logged_biases(Path::new(one)), logged_biases(Path::new(&out)));
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.len(), b.len(), "--pp {n} {schedule}: {a:?} vs {b:?}");
            for ((name, x), (other, y)) in a.iter().zip(b) {
                assert_eq!(name, other);
                let far = x.iter().zip(y).any(|(p, q)| (p - q).abs() > 1e-7);
                assert!(!far, "--pp {n} {schedule}: {name}: bias statistics {x:?} vs {y:?}");
            }
        }
        // The checkpoint rank 0 writes holds every stage's weights and AdamW's states whole, as
        // one process's: streamed from the other ranks as it writes them (the first replica's,
        // each split state made whole with the replicas' shards as its turn comes, --zero1; with
        // --ep the other expert-parallel pipelines' experts too).
        let step3 = |dir: &str| Path::new(dir).join("step-3");
        let files = vec![
            (step3(&out), step3(one)),
            (step3(&out).join("optimizer.safetensors"), step3(one).join("optimizer.safetensors")),
        ];
        for (theirs, ours) in files {
            let theirs = kiln_runtime::weights::open_checkpoint(&theirs).unwrap();
            let ours = kiln_runtime::weights::open_checkpoint(&ours).unwrap();
            assert_eq!(theirs.len(), ours.len());
            for info in ours.tensors() {
                let (a, b) = (ours.read(&info.name).unwrap(), theirs.read(&info.name).unwrap());
                assert_eq!(a.shape, b.shape, "{}", info.name);
                let (kiln_runtime::weights::HostData::F32(a), kiln_runtime::weights::HostData::F32(b)) =
                    (a.data, b.data)
                else {
                    continue;
                };
                // Relative to the value or 0.01: a weight near 0 moves by AdamW's normalised steps,
                // which rounding differences in a gradient near AdamW's eps move most. Expert
                // parallelism adds each token's experts in another order in the forward pass too,
                // so a gradient that cancels to ~1e-10 (below eps = 1e-8) moves its weight's update
                // by a few % of it: measured 1.9e-4 here, 3.5e-4 on tiny with 4 rows.
                let worst =
                    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (x.abs() + 1e-2)).fold(0f32, f32::max);
                let bound = if ep > 1 { 1e-3 } else { 1e-4 };
                assert!(
                    worst < bound,
                    "--pp {n} {schedule} --dp {dp} --ep {ep}: {}: {worst:e} apart",
                    info.name
                );
            }
        }
    }
    // A peer that never answers: rank 0 gives up after --comm-timeout, naming what it waited for;
    // one that dies: mpirun ends the others. From the 1F1B run's artifact (no compile).
    let artifact = s.path("pp2-dp1-ep1-1f1b").join("train.kiln").display().to_string();
    let out = s.path("stall").display().to_string();
    let mut args: Vec<String> = run(
        "models/tiny.toml",
        "4",
        &out,
        &["--pp", "2", "--comm-timeout", "2", "--inject-fault", "stall:1@2"],
    );
    args[1] = artifact.clone();
    let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("error: rank 0 of 2 waited 2 s for stage 1's"), "{}", r.stderr);
    // A checkpoint slower than --comm-timeout: rank 1 serves rank 0's requests as it writes,
    // waiting for each within the checkpoint wait.
    let out = s.path("slow").display().to_string();
    let flags = ["--pp", "2", "--comm-timeout", "1", "--save-every", "1", "--inject-fault", "slow-save:3@1"];
    let mut args: Vec<String> = run("models/tiny.toml", "4", &out, &flags);
    args[1] = artifact.clone();
    let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(Path::new(&out).join("step-3").is_dir(), "{}", r.stdout);
    let out = s.path("dead").display().to_string();
    let mut args: Vec<String> =
        run("models/tiny.toml", "4", &out, &["--pp", "2", "--inject-fault", "exit:1@2"]);
    args[1] = artifact;
    let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(!r.ok);
    assert!(r.stderr.contains("rank 1: exiting before step 2"), "{}", r.stderr);
    // A non-finite step: the rank whose stage made the NaN finds the launch, the next rank the
    // activations it received non-finite, each re-checking its own part; the leader says the alert
    // once, and a scope no stage has is refused before any step.
    let nan = |scope: &str, out: &str| {
        let out = s.path(out).display().to_string();
        let fault = format!("nan:{scope}@2");
        let mut args: Vec<String> =
            run("models/tiny.toml", "4", &out, &["--pp", "2", "--inject-fault", &fault]);
        args[1] = s.path("pp2-dp1-ep1-1f1b").join("train.kiln").display().to_string();
        mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120))
    };
    let r = nan("model.layers.1.mlp", "nan");
    assert!(!r.ok);
    assert_eq!(r.stderr.matches("alert: step 2: non_finite").count(), 1, "{}", r.stderr);
    let first = "monitor: step 2 (rank 0 of 2): the compiled step: the first non-finite value is %";
    assert!(r.stderr.contains(first) && r.stderr.contains(") in scope model.layers.1.mlp ("), "{}", r.stderr);
    let received = "monitor: step 2 (rank 1 of 2): the compiled step: the first non-finite value is ";
    let received =
        r.stderr.lines().find(|l| l.starts_with(received)).unwrap_or_else(|| panic!("{}", r.stderr));
    assert!(
        received.contains("of stage 0's activations of micro-batch 0 (rank 0), as received ("),
        "{received}"
    );
    let r = nan("model.layers.9.mlp", "nan-nowhere");
    assert!(!r.ok);
    assert!(
        r.stderr.contains(
            "no launch of the pipeline's forward programs is in scope `model.layers.9.mlp`; their scopes: "
        ),
        "{}",
        r.stderr
    );
    // Refused before any step, by name: a pipeline compiled without the replicas' sums, run with
    // --dp.
    let out = s.path("refused").display().to_string();
    let mut args = run("models/tiny.toml", "8", &out, &["--pp", "2", "--dp", "2"]);
    args[1] = s.path("pp2-dp1-ep1-1f1b").join("train.kiln").display().to_string();
    let r = mpirun(4, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(!r.ok && r.stderr.contains("sum nothing over data-parallel replicas"), "{}", r.stderr);
}

/// Without the bias rule no program writes the routers' biases, and a pipeline's last rank holds
/// its stages' biases only to read them: its checkpoint still has every tensor one process's has
/// (it lacked the last stage's biases, so it could be neither resumed nor run), and resumes.
#[test]
fn a_pipeline_checkpoint_holds_the_tensors_no_step_writes() {
    let s = Scratch::new();
    let (one, two) = (s.str("one"), s.str("two"));
    let flags = ["--mtp-lambda", "0.3", "--bias-update-speed", "0"];
    let r = kiln(&[&train_args("models/tiny.toml", &one, "1")[..], &flags].concat());
    assert!(r.ok, "{}", r.stderr);
    let args = [&train_args("models/tiny.toml", &two, "1")[..], &flags, &["--pp", "2"]].concat();
    let r = mpirun(2, &args, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let names = |dir: &str| -> Vec<String> {
        let c = kiln_runtime::weights::open_checkpoint(&Path::new(dir).join("step-1")).unwrap();
        let mut v: Vec<String> = c.tensors().map(|t| t.name.clone()).collect();
        v.sort();
        v
    };
    let (ours, theirs) = (names(&one), names(&two));
    let missing: Vec<&String> = ours.iter().filter(|n| !theirs.contains(n)).collect();
    assert!(missing.is_empty(), "the pipeline's checkpoint lacks {missing:?}");
    assert_eq!(ours, theirs);
    let from = format!("{two}/step-1");
    let resume = [&["train", "models/tiny.toml", "--resume", &from][..], &flags].concat();
    let rest = ["--data", DATA, "--batch", "4", "--steps", "2", "--threads", "1", "--out", &two];
    let r = kiln(&[&resume[..], &rest].concat());
    assert!(r.ok && r.stdout.contains("step     2"), "{}{}", r.stdout, r.stderr);
}

/// `kiln run --ep 2` under `mpirun -n 2`: each process holds half of every MoE layer's routed
/// experts (`kiln compile --pp 1 --ep 2`), the partial sums of the experts meet in an all-reduce,
/// and generation gives the one-process tokens with logits equal to rounding.
#[test]
fn experts_split_over_two_ranks_decode_as_one_process() {
    let s = Scratch::new();
    let art = s.path("ep.kiln").display().to_string();
    let r = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--max-context",
        "64",
        "--pp",
        "1",
        "--ep",
        "2",
        "-o",
        &art,
    ]);
    assert!(r.ok, "{}", r.stderr);
    let run = |logits: &str, extra: &[&str]| {
        let mut a = vec!["run", &art, "--random-weights", "1", "--prompt-ids", "1,2,3,4,5,6,7,8"];
        a.extend(["--max-new-tokens", "12", "--dump-logits", logits]);
        a.extend(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let (one, two) = (s.path("one.txt").display().to_string(), s.path("two.txt").display().to_string());
    let single = kiln(&run(&one, &[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(single.ok, "{}", single.stderr);
    let args = run(&two, &["--ep", "2"]);
    let split = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(300));
    assert!(split.ok, "{}\n{}", split.stdout, split.stderr);
    // The same tokens, printed once.
    assert_eq!(split.stdout, single.stdout);
    assert!(split.stderr.contains("expert-parallel rank 0 of 2 (MPI)"), "{}", split.stderr);
    let rows = |path: &str| -> Vec<Vec<f64>> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect()
    };
    let (a, b) = (rows(&one), rows(&two));
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    let worst =
        a.iter().zip(&b).flat_map(|(x, y)| x.iter().zip(y)).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-5, "logits {worst:e} apart");
    // Rank 0 holds its half of the experts: fewer parameter bytes than the whole model.
    let bytes = |err: &str| -> u64 {
        let at = err.find("parameters ").expect("the parameter bytes") + "parameters ".len();
        err[at..].split(' ').next().unwrap().parse().unwrap()
    };
    assert!(bytes(&split.stderr) < bytes(&single.stderr), "{}\n{}", split.stderr, single.stderr);
    // Refused by name: a different number of processes, and an artifact with no split.
    let r = mpirun(
        2,
        &run(&two, &["--ep", "3"]).iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(120),
    );
    assert!(!r.ok && r.stderr.contains("--ep 3: mpirun started 2 processes"), "{}", r.stderr);
    // The expert load: each rank counts its own experts' rows (its slots of the other's experts
    // have no expert there), and rank 0 puts the ranks' counts together: one process's load.
    let load = |stdout: &str| -> serde_json::Value {
        let doc: serde_json::Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        doc["expert_load"].clone()
    };
    let single =
        kiln(&run(&one, &["--expert-load", "--json"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(single.ok, "{}", single.stderr);
    let args = run(&two, &["--ep", "2", "--expert-load", "--json"]);
    let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(r.ok, "{}", r.stderr);
    let (whole, parts) = (load(&single.stdout), load(&r.stdout));
    assert_eq!(whole.as_array().map(Vec::len), Some(3), "{whole}");
    assert_eq!(parts, whole);
    assert!(r.stderr.contains("8 tokens x top-4 over 16 experts"), "{}", r.stderr);
    let plain = s.path("plain.kiln").display().to_string();
    let r = kiln(&["compile", "models/tiny.toml", "--target", "cpu", "--max-context", "64", "-o", &plain]);
    assert!(r.ok, "{}", r.stderr);
    let mut args = run(&two, &["--ep", "2"]);
    args[1] = plain;
    let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));
    assert!(!r.ok && r.stderr.contains("has no expert-parallel programs"), "{}", r.stderr);
}

/// Expert-parallel training (`--ep`): each process trains on its own rows with half of every MoE
/// layer's routed experts, the tokens going to the experts' ranks and back. The steps are one
/// process's (losses and gradient norms within 1e-6 relative), alone, with gradient accumulation
/// and as two data-parallel replicas of the pair; the checkpoint holds every expert under its own
/// name, and a resume continues bit for bit.
#[test]
fn experts_split_over_two_ranks_train_as_one_process() {
    let s = Scratch::new();
    let args = |out: &str, steps: &str, extra: &[&str]| -> Vec<String> {
        let mut a =
            vec!["train", "models/tiny.toml", "--random-weights", "1", "--data", DATA, "--batch", "4"];
        a.extend(["--steps", steps, "--threads", "1", "--out", out]);
        a.extend(LOSSES);
        a.extend(extra);
        a.into_iter().map(String::from).collect()
    };
    let run = |n: usize, a: Vec<String>| -> Out {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = if n == 1 { kiln(&a) } else { mpirun(n, &a, Duration::from_secs(300)) };
        assert!(r.ok, "{:?}\n{}\n{}", a, r.stdout, r.stderr);
        r
    };
    let dir = |name: &str| s.path(name).display().to_string();
    let (one, two, acc, grid) = (dir("one"), dir("two"), dir("acc"), dir("grid"));
    run(1, args(&one, "3", &[]));
    let r = run(2, args(&two, "3", &["--ep", "2"]));
    assert!(r.stdout.contains("expert-parallel rank 0 of 2 (experts 0..8 of each MoE layer"), "{}", r.stdout);
    assert!(r.stdout.contains("token rows for other ranks travelled"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("step     3").count(), 1, "rank 0 alone speaks: {}", r.stdout);
    run(2, args(&acc, "3", &["--ep", "2", "--micro-batch", "1"]));
    let r = run(4, args(&grid, "3", &["--ep", "2", "--dp", "2"]));
    assert!(r.stdout.contains("replica 0 of 2, 1 rows each"), "{}", r.stdout);
    let reference = logged(Path::new(&one));
    assert_eq!(reference.len(), 3);
    assert_close("--ep 2", &logged(Path::new(&two)), &reference);
    assert_close("--ep 2 with two micro-batches", &logged(Path::new(&acc)), &reference);
    assert_close("--ep 2 --dp 2", &logged(Path::new(&grid)), &reference);

    // Four ranks of one router group each (tiny: 4 groups of 4 experts, a token's experts in its
    // top 2 groups): DeepSeek's dispatch sends a token to at most 2 ranks, itself perhaps one of
    // them, so at most 2 of the 3 other ranks' rows travel; every token to every rank would be 3.
    let four = dir("four");
    run(4, args(&four, "1", &["--ep", "4"]));
    assert_close("--ep 4", &logged(Path::new(&four)), &reference[..1]);
    let c = logged_communication(Path::new(&four));
    let (sent, offered) = (c["rows_sent"].as_f64().unwrap(), c["rows_offered"].as_f64().unwrap());
    eprintln!("--ep 4: {sent} of {offered} token rows for other ranks travelled");
    assert!(sent > 0.0 && sent <= offered * 2.0 / 3.0, "{sent} of {offered} rows sent");

    // The checkpoint: every tensor of one process's, each expert's under its own name and close to
    // its value there (AdamW's first steps magnify the sums' rounding in near-zero gradients, as
    // data parallelism's do); the biases move by whole-token loads, bit for bit.
    let open = |d: &str, f: &str| {
        kiln_runtime::weights::open_checkpoint(&Path::new(d).join("step-3").join(f)).unwrap()
    };
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (open(&one, f), open(&two, f));
        let mut names: Vec<String> = a.tensors().map(|t| t.name.clone()).collect();
        let mut theirs: Vec<String> = b.tensors().map(|t| t.name.clone()).collect();
        names.sort();
        theirs.sort();
        assert_eq!(names, theirs, "{f}");
        assert!(names.iter().any(|n| n.contains(".experts.15.")), "{f}");
        for n in &names {
            let floats = |t: kiln_runtime::weights::HostTensor| match t.data {
                kiln_runtime::weights::HostData::F32(v) => v,
                kiln_runtime::weights::HostData::I64(v) => v.into_iter().map(|x| x as f32).collect(),
            };
            let (x, y) = (floats(a.read(n).unwrap()), floats(b.read(n).unwrap()));
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let worst = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
            assert!(worst <= 5e-4, "{f}: `{n}` differs by {worst:e} of its largest value");
        }
    }
    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    let m = "model.safetensors";
    assert_eq!(open(&two, m).read(bias).unwrap().data, open(&one, m).read(bias).unwrap().data);

    // Two steps, then a resume to three: the uninterrupted run's weights, bit for bit.
    let half = dir("half");
    run(2, args(&half, "2", &["--ep", "2"]));
    let from = format!("{half}/step-2");
    run(2, args(&half, "3", &["--ep", "2", "--resume", &from]));
    let bytes = |d: &str| std::fs::read(Path::new(d).join("step-3/model.safetensors")).unwrap();
    assert!(bytes(&half) == bytes(&two), "a resumed expert-parallel run differs from an uninterrupted one");

    // ZeRO-1 with expert parallelism: the replicated weights' AdamW states split over both
    // processes, each rank's experts' states whole on it. The same run, checkpoint and optimizer
    // states bit for bit, resumed too.
    let z = dir("zero1");
    let r = run(2, args(&z, "3", &["--ep", "2", "--zero1"]));
    assert!(r.stdout.contains("(split over the replicas: ZeRO-1)"), "{}", r.stdout);
    let file = |d: &str, f: &str| std::fs::read(Path::new(d).join("step-3").join(f)).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(file(&z, f) == file(&two, f), "--ep 2 --zero1: {f} differs from --ep 2's");
    }
    let z2 = dir("zero1-half");
    run(2, args(&z2, "2", &["--ep", "2", "--zero1"]));
    let from = format!("{z2}/step-2");
    run(2, args(&z2, "3", &["--ep", "2", "--zero1", "--resume", &from]));
    assert!(
        file(&z2, "optimizer.safetensors") == file(&two, "optimizer.safetensors"),
        "a resumed --zero1 run"
    );
    // With two replicas of the group (four processes), each expert's states are split over the
    // two processes that hold it as well; resumed from step 2 too.
    let zg = dir("zero1-grid");
    run(4, args(&zg, "2", &["--ep", "2", "--dp", "2", "--zero1"]));
    let from = format!("{zg}/step-2");
    let r = run(4, args(&zg, "3", &["--ep", "2", "--dp", "2", "--zero1", "--resume", &from]));
    assert!(r.stdout.contains("(split over the replicas: ZeRO-1)"), "{}", r.stdout);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(file(&zg, f) == file(&grid, f), "--ep 2 --dp 2 --zero1: {f} differs from --ep 2 --dp 2's");
    }
    // Expert-parallel pipelines (--pp 2 --ep 2, four processes): rank 0 streams the checkpoint,
    // asking each process for its tensors as the files need them; with --zero1 the processes
    // holding a split state's shards gather it first. The same bytes either way.
    let (pe, pez) = (dir("pp-ep"), dir("pp-ep-zero1"));
    run(4, args(&pe, "3", &["--pp", "2", "--ep", "2"]));
    run(4, args(&pez, "3", &["--pp", "2", "--ep", "2", "--zero1"]));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(file(&pe, f) == file(&pez, f), "--pp 2 --ep 2: {f} differs between split and whole states");
    }

    // An artifact compiled for two expert-parallel ranks (`kiln compile --train --pp 1 --ep 2`)
    // trains the same steps, and only as such.
    let art = compile(&s, "ep.kiln", &["--pp", "1", "--ep", "2"]);
    let from_art = dir("from-artifact");
    let mut a = train_args(&art, &from_art, "3");
    a.extend(["--ep", "2"]);
    let r = mpirun(2, &a, Duration::from_secs(300));
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert_close("an --ep 2 artifact", &logged(Path::new(&from_art)), &reference);
    let r = kiln(&train_args(&art, &dir("alone-artifact"), "1"));
    assert!(!r.ok);
    assert!(
        r.stderr.contains("is one rank's of 2 expert-parallel ranks: run it with --ep 2"),
        "{}",
        r.stderr
    );
    // A peer that never answers: rank 0 gives up after --comm-timeout, naming the collective.
    let stall = dir("stall");
    let mut a = train_args(&art, &stall, "3");
    a.extend(["--ep", "2", "--comm-timeout", "2", "--inject-fault", "stall:1@2"]);
    let r = mpirun(2, &a, Duration::from_secs(120));
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("error: rank 0 of 2 waited 2 s for the other ranks in the flags of the all-to-all of"),
        "{}",
        r.stderr
    );

    // A non-finite step: the leader says the alert once, each rank where its own re-check found
    // the first non-finite value, and the job stops.
    let nan = dir("nan");
    let mut a = train_args(&art, &nan, "3");
    a.extend(["--ep", "2", "--inject-fault", "nan:model.layers.1.mlp@2"]);
    let r = mpirun(2, &a, Duration::from_secs(120));
    assert!(!r.ok);
    assert_eq!(r.stderr.matches("alert: step 2: non_finite").count(), 1, "{}", r.stderr);
    for rank in 0..2 {
        let line =
            format!("monitor: step 2 (rank {rank} of 2): the compiled step: the first non-finite value is");
        assert!(r.stderr.contains(&line), "{}", r.stderr);
    }

    // Mistakes are refused before any step, naming the fix.
    let r = mpirun(
        3,
        &args(&dir("three"), "1", &["--ep", "3"]).iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(120),
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("--ep 3: model `tiny` has 16 routed experts per MoE layer"), "{}", r.stderr);
    let zero = args(&dir("zero"), "1", &["--pp", "2", "--ep", "2", "--zero1"]);
    let r = kiln(&zero.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!r.ok);
    assert!(
        r.stderr.contains("--pp 2 --ep 2 runs 4 processes: launch them with `mpirun -n 4"),
        "{}",
        r.stderr
    );
    let r = kiln(&args(&dir("alone"), "1", &["--ep", "2"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!r.ok);
    assert!(r.stderr.contains("launch them with `mpirun -n 2 kiln train ... --ep 2`"), "{}", r.stderr);
}

/// The multi-process runs on CUDA (`--device cuda` with `--dp`, `--ep` or `--pp`): each process
/// runs the compiled step on its device (the one of its local rank; processes may share one), and
/// the collectives and pipeline messages go over MPI through host memory. The steps are one CPU
/// process's within 1e-5 relative. Without a driver every process says so before anything is
/// written, and the test says why it skipped the runs.
#[test]
fn multi_process_runs_train_on_cuda_like_one_cpu_process() {
    let s = Scratch::new();
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a =
            vec!["train", "models/tiny.toml", "--random-weights", "1", "--data", DATA, "--batch", "4"];
        a.extend(["--micro-batch", "1", "--steps", "3", "--out", out]);
        a.extend(LOSSES);
        a.extend(extra);
        a.into_iter().map(String::from).collect()
    };
    let cpu = s.path("cpu").display().to_string();
    let runs = [("dp", ["--dp", "2"]), ("ep", ["--ep", "2"]), ("pp", ["--pp", "2"])];
    let present = kiln_runtime::cuda::driver_present();
    if present {
        let r = kiln(&strs(&args(&cpu, &["--threads", "1"])));
        assert!(r.ok, "{}", r.stderr);
    }
    for (name, flags) in runs {
        let out = s.path(name).display().to_string();
        let mut extra = vec!["--device", "cuda"];
        extra.extend(flags);
        let r = mpirun(2, &strs(&args(&out, &extra)), Duration::from_secs(600));
        if !present {
            assert!(!r.ok);
            assert!(r.stderr.contains("error: no CUDA driver: libcuda could not be loaded"), "{}", r.stderr);
            assert!(
                !Path::new(&out).join("metrics.jsonl").exists(),
                "nothing is written before the device is found"
            );
            continue;
        }
        assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("compiled for CUDA device "), "{}", r.stdout);
        let (ours, theirs) = (logged(Path::new(&out)), logged(Path::new(&cpu)));
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            let rel = (a.0 - b.0).abs() / b.0.abs();
            assert!(rel <= 1e-5, "--device cuda {flags:?}: loss {} against the CPU's {} ({rel:e})", a.0, b.0);
        }
    }
    if !present {
        eprintln!("skipped the multi-process CUDA training runs: no CUDA driver on this machine");
    }
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// A step the monitor rejects stops at its gate on every rank of a pipeline, before any rank's
/// update changes the model, as it does on one process: with a spike test so strict that most
/// steps are rejected (against the last two kept steps, `--spike-z 0.1`), a two-rank
/// 1F1B pipeline and a two-rank DualPipe skip the same batches as one process and keep the same
/// steps, and no rank copies its states before each step. Under `--on-anomaly rollback` a 1F1B
/// pipeline goes back to its checkpoint as one process does (rank 0's copy of it holds the other
/// rank's routers' biases, gathered for the monitor's report, which that rank puts back itself).
#[test]
fn pipeline_ranks_skip_the_batches_one_process_skips() {
    let s = Scratch::new();
    // 24 rows of 33 token ids, a u16 stream.
    let data = s.path("data.bin");
    let mut x = 12345u32;
    let ids: Vec<u8> = (0..24 * 33)
        .flat_map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((2 + (x >> 16) % 510) as u16).to_le_bytes()
        })
        .collect();
    std::fs::write(&data, ids).unwrap();
    let data = data.display().to_string();
    // Skip-batch undoes six of the ten steps tried (the spikes' z-scores 0.2 and up, the kept
    // steps' under 0.05); rollback five, over 6 steps (z-scores 2.4 and up, and under 1).
    let run = |out: &str, policy: &str, extra: &[&str]| {
        let (z, steps) = if policy == "rollback" { ("1.5", "6") } else { ("0.1", "4") };
        let mut a =
            vec!["train", "models/tiny.toml", "--random-weights", "1", "--data", &data, "--dtype", "u16"];
        a.extend([
            "--seq-len",
            "32",
            "--batch",
            "4",
            "--micro-batch",
            "1",
            "--steps",
            steps,
            "--threads",
            "1",
        ]);
        a.extend(["--on-anomaly", policy, "--spike-z", z, "--spike-warmup", "2", "--spike-window", "2"]);
        a.extend(["--save-every", "2", "--out", out]);
        a.extend(LOSSES);
        a.extend(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    // The skips and rollbacks of a run: (event, step, rows).
    let undone = |dir: &str| -> Vec<(String, u64, serde_json::Value)> {
        let text = std::fs::read_to_string(Path::new(dir).join("metrics.jsonl")).unwrap();
        (text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()))
            .filter(|l| l["event"] == "skip" || l["event"] == "rollback")
            .map(|l| {
                (l["event"].as_str().unwrap().to_string(), l["step"].as_u64().unwrap(), l["rows"].clone())
            })
            .collect()
    };
    for policy in ["skip-batch", "rollback"] {
        let one = s.str(&format!("one-{policy}"));
        let r = kiln(&run(&one, policy, &[]).iter().map(String::as_str).collect::<Vec<_>>());
        assert!(r.ok, "{}", r.stderr);
        let (want, want_undone) = (logged(Path::new(&one)), undone(&one));
        assert!(want_undone.len() >= 2, "the test needs rejected steps: {want_undone:?}");
        let schedules: &[&str] = if policy == "rollback" { &["1f1b"] } else { &["1f1b", "dualpipe"] };
        for schedule in schedules {
            let out = s.str(&format!("{schedule}-{policy}"));
            let args = run(&out, policy, &["--pp", "2", "--pp-schedule", schedule]);
            let r = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(300));
            assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
            assert_eq!(undone(&out), want_undone, "{schedule} {policy}");
            let got = logged(Path::new(&out));
            assert_eq!(got.len(), want.len(), "{schedule} {policy}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
                assert!(
                    rel(g.0, w.0) < 1e-6 && rel(g.1, w.1) < 1e-5,
                    "{schedule} {policy}: line {}: {g:?} vs {w:?}",
                    i + 1
                );
            }
            let copies = logged_event(Path::new(&out), "monitor_copies");
            assert_eq!(
                (&copies["gate"], &copies["copy_before_each_step"]),
                (&true.into(), &false.into()),
                "{copies}"
            );
        }
    }
}
