//! The executor's device path for collectives (`Executor::set_device_collectives`, what NCCL
//! carries on CUDA), checked on the CPU: a transport that carries out each message's plan
//! (`DeviceMessage::moves`) on the CPU backend's memory must leave a data-parallel train step,
//! ZeRO-1's gathers included, bit for bit where the host path leaves it. Both paths run in one
//! process against the same two-process world, simulated: the other replica holds half of each of
//! this one's values ([`peer`]), so that a part out of place or a gather in the wrong rank order
//! changes the step.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use kiln_compiler::pack;
use kiln_compiler::train::Optimizer;
use kiln_runtime::comm::{Communicator, DeviceCollectives, DeviceKind, DeviceMessage, InFlight, Move};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::data::{self, TokenFormat};
use kiln_runtime::train::CompiledTrainer;
use kiln_runtime::weights::{self, HostData, HostTensor};
use kiln_runtime::RuntimeError;

use crate::util::{root, Scratch};

/// A finished collective's values.
struct Done(Vec<f32>);

impl InFlight for Done {
    fn test(&mut self) -> Result<bool, RuntimeError> {
        Ok(true)
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.0)
    }
}

/// The other replica's value where this one has `v`.
fn peer(v: f32) -> f32 {
    v * 0.5
}

/// Rank 0 of two in group `dp`, the other replica's values [`peer`] of this one's.
struct Mirror;

impl Communicator for Mirror {
    fn rank_in(&self, group: &str) -> Option<(usize, usize)> {
        (group == "dp").then_some((0, 2))
    }

    fn all_reduce_sum(&self, _group: &str, data: &mut [f32]) -> Result<(), RuntimeError> {
        data.iter_mut().for_each(|v| *v += peer(*v));
        Ok(())
    }

    fn start_all_gather(&self, _group: &str, data: Vec<f32>) -> Result<Box<dyn InFlight>, RuntimeError> {
        let theirs: Vec<f32> = data.iter().map(|&v| peer(v)).collect();
        Ok(Box::new(Done([data, theirs].concat())))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// The same world on device memory (the CPU backend's, which the host addresses directly): each
/// message's moves carried out as NCCL would, and every message kept for the test.
struct MirrorDevice(Rc<RefCell<Vec<DeviceMessage>>>);

impl DeviceCollectives for MirrorDevice {
    fn has_group(&self, group: &str) -> bool {
        group == "dp"
    }

    fn start(&self, m: &DeviceMessage) -> Result<Box<dyn InFlight>, RuntimeError> {
        let mut staging = vec![0u8; m.staging()];
        for mv in m.moves() {
            // SAFETY: the executor gives the addresses of its own arena and states, each part
            // inside them (the same bytes the host path reads and writes).
            unsafe {
                match mv {
                    Move::In { src, at, bytes } => {
                        std::ptr::copy_nonoverlapping(src as *const u8, staging[at..].as_mut_ptr(), bytes)
                    }
                    Move::Sum { values } => {
                        for c in staging[..4 * values].chunks_mut(4) {
                            let v = f32::from_le_bytes(c.try_into().unwrap());
                            c.copy_from_slice(&(v + peer(v)).to_le_bytes());
                        }
                    }
                    Move::Gather { values, size, to } => {
                        assert_eq!(size, 2);
                        let mine = staging[..4 * values].to_vec();
                        let theirs: Vec<u8> = (mine.chunks(4))
                            .flat_map(|c| peer(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                            .collect();
                        staging[to..to + mine.len()].copy_from_slice(&mine);
                        staging[to + mine.len()..to + 2 * mine.len()].copy_from_slice(&theirs);
                    }
                    Move::Out { at, dst, bytes } => {
                        std::ptr::copy_nonoverlapping(staging[at..].as_ptr(), dst as *mut u8, bytes)
                    }
                }
            }
        }
        self.0.borrow_mut().push(m.clone());
        Ok(Box::new(Done(Vec::new())))
    }

    fn describe(&self) -> String {
        "a mirror on host memory".into()
    }
}

fn f32s(t: &HostTensor) -> Vec<u32> {
    match &t.data {
        HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        HostData::I64(v) => v.iter().map(|&x| x as u32).collect(),
    }
}

/// What two steps leave: each step's loss and gradient norm, every weight and state by name (as
/// bits), and what the collectives cost.
type Steps = (Vec<(u32, u32)>, Vec<(String, Vec<u32>)>, kiln_runtime::comm::CommStats);

/// Two steps of `art` on the CPU under [`Mirror`], through the device path or the host's: the
/// losses and gradient norms, every weight and state after them (as bits), and what the
/// collectives cost.
fn two_steps(
    art: &kiln_runtime::artifact::Artifact,
    initial: &[HostTensor],
    device: Option<Rc<RefCell<Vec<DeviceMessage>>>>,
) -> Steps {
    let wanted = weights::manifest_params(art.manifest()).unwrap();
    let given = initial.iter().filter(|t| wanted.iter().any(|d| d.name == t.name)).cloned().map(Ok);
    let model = CpuModel::load(art, given, &CpuOptions { threads: 2, ..CpuOptions::default() }).unwrap();
    let mut trainer = CompiledTrainer::new(model).unwrap();
    let exec = trainer.executor_mut();
    exec.set_communicator(Box::new(Mirror)).unwrap();
    // The CPU backend's memory is the host's: it has no device transport of its own.
    let e = exec.join_device_collectives().unwrap_err().to_string();
    assert!(e.contains("has no device transport (NCCL needs --device cuda)"), "{e}");
    if let Some(log) = device {
        exec.set_device_collectives(Box::new(MirrorDevice(log))).unwrap();
    }
    let rows =
        data::load_tokens(&root().join("tests/goldens/train/tokens.safetensors"), &TokenFormat::Safetensors)
            .unwrap();
    let stats: Vec<(u32, u32)> = (0..2)
        .map(|_| {
            let st = trainer.step(&rows, 1e-3).unwrap();
            (st.loss.to_bits(), st.grad_norm.to_bits())
        })
        .collect();
    let mut all: Vec<(String, Vec<u32>)> =
        (trainer.weights().unwrap().into_iter().chain(trainer.states().unwrap()))
            .map(|t| (t.name.clone(), f32s(&t)))
            .collect();
    all.sort();
    let comm = trainer.executor_mut().take_comm_stats();
    (stats, all, comm)
}

/// A data-parallel step (and one with ZeRO-1's split states, whose gathers are device messages
/// too) takes the same two steps, bit for bit, whether its sums go through the host or through a
/// device transport; the transport is given one message per bucket, each part an f32 buffer of the
/// executor's, in the host path's order and sizes.
#[test]
fn the_device_path_of_collectives_leaves_a_data_parallel_step_as_the_host_path_does() {
    let s = Scratch::new();
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let decls = weights::graph_params(&kiln_compiler::build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<HostTensor> = weights::random_tensors(decls, 5, 0.02).collect();
    for shards in [1u32, 2] {
        let options = pack::Options {
            train: Some(pack::TrainOptions {
                losses: Default::default(),
                optimizer: Optimizer { shards, ..Optimizer::default() },
                accumulate: false,
                data_parallel: true,
                expert_parallel: None,
            }),
            kv_cache: false,
            score: false,
            ..pack::Options::new(kiln_compiler::target::Targets::Cpu, 4, 32)
        };
        let dir = s.path(&format!("dp-{shards}"));
        let artifact = pack::compile(pack::Source::Spec(spec.clone()), &options, &mut ()).unwrap();
        pack::write(&artifact, &dir).unwrap();
        let art = kiln_runtime::artifact::load(Path::new(&dir)).unwrap();
        let (host_steps, host_values, host_comm) = two_steps(&art, &initial, None);
        let log = Rc::new(RefCell::new(Vec::new()));
        let (dev_steps, dev_values, dev_comm) = two_steps(&art, &initial, Some(log.clone()));
        assert_eq!(dev_steps, host_steps, "shards {shards}: losses and gradient norms");
        assert_eq!(dev_values.len(), host_values.len());
        for ((name, d), (_, h)) in dev_values.iter().zip(&host_values) {
            assert!(d == h, "shards {shards}: {name} differs between the device and host paths");
        }
        // The same messages, of the same sizes; every one of them went to the device.
        assert_eq!(
            (dev_comm.messages, dev_comm.bytes),
            (host_comm.messages, host_comm.bytes),
            "shards {shards}"
        );
        let log = log.borrow();
        assert_eq!(log.len() as u64, dev_comm.messages, "shards {shards}");
        let gathers = log.iter().filter(|m| matches!(m.kind, DeviceKind::Gather { size: 2 })).count();
        match shards {
            1 => assert_eq!(gathers, 0),
            _ => assert!(gathers > 0, "ZeRO-1's gathers went through the device path"),
        }
        assert!(log
            .iter()
            .all(|m| m.group == "dp" && !m.parts.is_empty() && m.parts.iter().all(|p| p.bytes % 4 == 0)));
        eprintln!(
            "shards {shards}: {} messages ({gathers} gathers), {} bytes, bit-identical to the host path",
            dev_comm.messages, dev_comm.bytes
        );
    }
}
