//! The schedules against the DualPipe table, the verifier against broken lists, the simulator
//! against closed forms.

use kiln_ir::schedule::{Instr, Rank, Schedule};

use super::simulate::{CostError, SimulateError};
use super::verify::VerifyError;
use super::*;

/// The costs of the table tests: distinct and non-trivial, so that a formula with a wrong
/// coefficient cannot match by accident. B is the full backward; F&B is less than F + B (overlap).
const F: f64 = 3.0;
const B: f64 = 5.0;
const W: f64 = 2.0;
const FB: f64 = 7.0;

fn costs(comm: f64) -> Costs {
    Costs::new(F, B, W, Some(FB), comm).unwrap()
}

fn run(kind: Kind, pp: u32, m: u32) -> Simulation {
    let s = generate(kind, pp, m).unwrap();
    verify(&s).unwrap();
    simulate(&s, &costs(0.0)).unwrap()
}

fn max_bubble(sim: &Simulation) -> f64 {
    sim.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max)
}

fn peak(sim: &Simulation) -> u32 {
    sim.ranks.iter().map(|r| r.peak_activations).max().unwrap()
}

#[test]
fn every_schedule_verifies_and_runs_over_a_grid_of_sizes() {
    for kind in Kind::ALL {
        for pp in 1..=8 {
            let min = kind.min_micro_batches(pp);
            for m in min..min + 5 {
                let Ok(s) = generate(kind, pp, m) else { continue };
                verify(&s).unwrap_or_else(|e| panic!("{} pp={pp} m={m}: {e}", kind.name()));
                let sim = simulate(&s, &costs(1.5)).unwrap();
                let computes = s.ranks.iter().flatten().filter(|i| i.is_compute()).count();
                assert_eq!(sim.events.len(), s.ranks.iter().map(Vec::len).sum::<usize>());
                assert!(computes > 0 && sim.makespan > 0.0);
                // Every rank does the work of its slots: F + B per micro-batch whose lane passes
                // through it, less the overlap of each F&B pair.
                for r in &sim.ranks {
                    let list = &s.ranks[r.rank.0 as usize];
                    let fb = list.iter().filter(|i| matches!(i, Instr::ForwardBackward { .. })).count();
                    let works: usize = (0..m)
                        .map(|mb| {
                            s.lane(kiln_ir::schedule::MicroBatch(mb))
                                .iter()
                                .filter(|x| x.rank == r.rank)
                                .count()
                        })
                        .sum();
                    let work = works as f64 * (F + B) - fb as f64 * (F + B - FB);
                    assert_eq!(r.busy, work, "{} pp={pp} m={m} {}", kind.name(), r.rank);
                }
            }
        }
    }
}

/// The DualPipe README's table (DeepSeek-V3 Table 2), row by row, for PP = 4, 8 and 16 and two
/// numbers of micro-batches each (the bubble does not grow with them).
///
/// Bubble is the simulator's per-rank `makespan - busy`; the table's value is the largest over
/// the ranks. 1F1B and ZB1P: every rank has it. DualPipe: the middle ranks (`pp/2-1`, `pp/2`)
/// have it; ranks nearer the ends idle a little less (at PP = 8: ranks 0 and 7 idle 16 against the
/// formula's 18, ranks 1 and 6 idle 17), because their warm-up forwards overlap more of the
/// pipeline's fill. DualPipeV: the last ranks have it. The DualPipe and DualPipeV formulas hold with
/// F&B given as measured (here 7 < F + B = 8): the pairs are the reason for the F&B term.
#[test]
fn the_simulator_reproduces_the_dualpipe_table() {
    for pp in [4u32, 8, 16] {
        let p = f64::from(pp);
        for m in [2 * pp, 4 * pp] {
            let sim = run(Kind::OneFOneB, pp, m);
            for r in &sim.ranks {
                assert_eq!(r.bubble, (p - 1.0) * (F + B), "1f1b pp={pp} m={m} {}", r.rank);
                assert_eq!(r.parameter_copies, 1.0);
            }
            assert_eq!(peak(&sim), pp, "1f1b activations");
            assert_eq!(sim.ranks[0].peak_activations, pp, "1f1b: the first rank holds pp");

            let sim = run(Kind::Zb1p, pp, m);
            for r in &sim.ranks {
                assert_eq!(r.bubble, (p - 1.0) * (F + B - 2.0 * W), "zb1p pp={pp} m={m} {}", r.rank);
                assert_eq!(r.parameter_copies, 1.0);
            }
            assert_eq!(peak(&sim), pp, "zb1p activations");

            let sim = run(Kind::DualPipe, pp, m);
            let formula = (p / 2.0 - 1.0) * (FB + B - 3.0 * W);
            assert_eq!(max_bubble(&sim), formula, "dualpipe pp={pp} m={m}");
            for mid in [pp / 2 - 1, pp / 2] {
                assert_eq!(sim.ranks[mid as usize].bubble, formula, "dualpipe middle rank {mid}");
            }
            assert!(sim.ranks.iter().all(|r| r.parameter_copies == 2.0));
            assert_eq!(peak(&sim), pp + 1, "dualpipe activations");

            // DualPipeV on pp ranks is the README's DualPipeV row with PP = 2·pp stages (its
            // "#Devices PP/2"): bubble (PP/2-1)(F&B+B-3W), PP+1 activations of a stage.
            let sim = run(Kind::DualPipeV, pp, m);
            let formula = (p - 1.0) * (FB + B - 3.0 * W);
            assert_eq!(max_bubble(&sim), formula, "dualpipev pp={pp} m={m}");
            assert_eq!(sim.ranks[pp as usize - 1].bubble, formula, "dualpipev: the last rank");
            assert!(sim.ranks.iter().all(|r| r.parameter_copies == 1.0));
            assert_eq!(peak(&sim), 2 * pp + 1, "dualpipev activations");
        }
    }
}

/// The closed forms hold far past the table's sizes, where a receive waits on a chain of sends
/// across many ranks: the simulator wakes each waiting rank when its data is sent.
#[test]
fn the_table_holds_at_sixty_four_ranks() {
    let sim = run(Kind::OneFOneB, 64, 1024);
    assert!(sim.ranks.iter().all(|r| r.bubble == 63.0 * (F + B)), "1f1b");
    assert_eq!(sim.makespan, f64::from(1024 + 63) * (F + B));
    let sim = run(Kind::DualPipe, 64, 256);
    assert_eq!(max_bubble(&sim), 31.0 * (FB + B - 3.0 * W), "dualpipe");
    assert_eq!(peak(&sim), 65, "dualpipe activations");
}

/// The step counts of the reference's example (PP = 8, 20 micro-batches; reference notes §6.3):
/// the overlapped pairs of a rank are two per round of step 4 (less the middle ranks' first) and
/// one per round of step 5.
#[test]
fn dualpipe_follows_the_reference_step_counts() {
    let s = generate(Kind::DualPipe, 8, 20).unwrap();
    let pairs: Vec<usize> = s
        .ranks
        .iter()
        .map(|l| l.iter().filter(|i| matches!(i, Instr::ForwardBackward { .. })).count())
        .collect();
    // Ranks 0/7: step 4 = 3, step 5 = 3; 1/6: 4, 2; 2/5: 5, 1; 3/4: 6 (less one), 0.
    assert_eq!(pairs, [9, 10, 11, 11, 11, 11, 10, 9]);
    // Step 1 on rank 0: 6 forwards of its own direction before anything else computes.
    let first: Vec<String> =
        s.ranks[0].iter().filter(|i| i.is_compute()).take(7).map(|i| i.to_string()).collect();
    assert_eq!(first, ["F m0.c0", "F m1.c0", "F m2.c0", "F m3.c0", "F m4.c0", "F m5.c0", "F m6.c0"]);
    // Rank 7 starts with the reverse direction: micro-batches 10.., on its chunk 1.
    assert_eq!(s.ranks[7].iter().find(|i| i.is_compute()).unwrap().to_string(), "F m10.c1");
}

#[test]
fn the_first_micro_batch_round_trip_with_communication() {
    // One micro-batch through 1F1B: down the pipeline and back, a transfer at each of the
    // 2(pp-1) hops: pp(F+B) + 2(pp-1)C.
    for pp in [2u32, 4, 8] {
        for c in [0.5, 1.0, 4.0] {
            let s = generate(Kind::OneFOneB, pp, 1).unwrap();
            let sim = simulate(&s, &costs(c)).unwrap();
            let p = f64::from(pp);
            assert_eq!(sim.makespan, p * (F + B) + 2.0 * (p - 1.0) * c, "pp={pp} C={c}");
        }
    }
}

#[test]
fn communication_adds_a_round_trip_every_pp_micro_batches_in_1f1b() {
    // In 1F1B's steady state the first rank holds pp micro-batches, and the round trip of one
    // (its forward on rank 0 to its backward on rank 0) is pp(F+B) + 2(pp-1)C, longer by
    // 2(pp-1)C than the pp(F+B) of work rank 0 has meanwhile. So every pp further micro-batches
    // cost exactly one round trip.
    for pp in [2u32, 4, 8] {
        let p = f64::from(pp);
        let c = 1.5;
        let makespan = |m| simulate(&generate(Kind::OneFOneB, pp, m).unwrap(), &costs(c)).unwrap().makespan;
        for k in 1..4 {
            let grow = makespan((k + 1) * pp) - makespan(k * pp);
            assert_eq!(grow, p * (F + B) + 2.0 * (p - 1.0) * c, "pp={pp} k={k}");
        }
        // With no communication cost the makespan is the textbook (m + pp - 1)(F + B).
        let free = simulate(&generate(Kind::OneFOneB, pp, 3 * pp).unwrap(), &costs(0.0)).unwrap();
        assert_eq!(free.makespan, f64::from(4 * pp - 1) * (F + B));
    }
}

fn broken(s: &Schedule) -> VerifyError {
    verify(s).expect_err("the broken schedule must be rejected")
}

#[test]
fn the_verifier_rejects_a_backward_before_its_forward() {
    let mut s = generate(Kind::OneFOneB, 2, 1).unwrap();
    // Rank 1 is: recv_act, F, BW, send_grad. Swap F and BW.
    assert_eq!(s.ranks[1].iter().map(|i| i.short_name()).collect::<Vec<_>>(), ["recv", "F", "BW", "send"]);
    s.ranks[1].swap(1, 2);
    let e = broken(&s);
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].at, Some((Rank(1), 1)));
    assert!(e.to_string().contains("the backward of m0 on r1.c0 comes before its forward (step 2)"), "{e}");
}

#[test]
fn the_verifier_rejects_an_unmatched_send_and_a_missing_weight_gradient() {
    let mut s = generate(Kind::OneFOneB, 2, 1).unwrap();
    s.ranks[1].remove(0); // the receive of the activations
    let e = broken(&s);
    assert!(
        e.to_string()
            .contains("the activations of m0 r0.c0->r1.c0 have 0 receives; each send needs exactly one"),
        "{e}"
    );

    let mut s = generate(Kind::Zb1p, 2, 2).unwrap();
    let w = s.ranks[0].iter().position(|i| matches!(i, Instr::Weight(_))).unwrap();
    s.ranks[0].remove(w);
    let e = broken(&s);
    assert!(e.to_string().contains("has 0 backward-for-weights steps; it needs exactly one"), "{e}");
}

#[test]
fn the_verifier_rejects_a_wrong_placement_and_a_stray_transfer() {
    let mut s = generate(Kind::DualPipe, 4, 8).unwrap();
    s.lanes[1].reverse();
    let e = broken(&s);
    assert!(
        e.to_string().contains("dualpipe places its stages wrongly: expected rank i holds stage i"),
        "{e}"
    );

    let mut s = generate(Kind::OneFOneB, 3, 1).unwrap();
    // A send from rank 0 straight to rank 2, skipping a stage.
    let Instr::SendActivation(mut t) = s.ranks[0][1] else { panic!("{:?}", s.ranks[0]) };
    t.to.rank = Rank(2);
    s.ranks[0].push(Instr::SendActivation(t));
    let e = broken(&s);
    assert!(
        e.to_string().contains("a send of the activations of m0 r0.c0->r2.c0, which do not flow there"),
        "{e}"
    );
}

#[test]
fn a_valid_list_that_deadlocks_is_caught_by_the_simulator() {
    let mut s = generate(Kind::OneFOneB, 2, 1).unwrap();
    // Rank 0 is: F, send_act, recv_grad, BW. Waiting for the gradient before sending the
    // activations is in order for the verifier, and deadlocks.
    assert_eq!(s.ranks[0].iter().map(|i| i.short_name()).collect::<Vec<_>>(), ["F", "send", "recv", "BW"]);
    s.ranks[0].swap(1, 2);
    verify(&s).unwrap();
    let e = simulate(&s, &costs(0.0)).unwrap_err();
    let SimulateError::Deadlock { waiting } = &e else { panic!("{e}") };
    assert_eq!(waiting.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(), [(Rank(0), 1), (Rank(1), 0)]);
    assert!(
        e.to_string().starts_with("the schedule deadlocks: r0 waits at step 1 (`recv_grad m0 r1.c0->r0.c0`)"),
        "{e}"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    assert_eq!(
        generate(Kind::DualPipe, 5, 20).unwrap_err().to_string(),
        "--pp 5: dualpipe needs an even number of ranks (rank i pairs with rank pp-1-i); try --pp 6"
    );
    assert!(generate(Kind::DualPipeV, 4, 7)
        .unwrap_err()
        .to_string()
        .starts_with("--micro-batches 7: dualpipev on 4 ranks needs at least 8 micro-batches"));
    assert!(generate(Kind::DualPipe, 4, 9).unwrap_err().to_string().contains("try --micro-batches 10"));
    // Sizes past what a simulation runs in seconds are refused before anything is built; the
    // limit counts stages, which DualPipe and DualPipeV have two of per rank.
    assert_eq!(
        generate(Kind::OneFOneB, 100_000, 100_000).unwrap_err().to_string(),
        "--pp 100000 --micro-batches 100000: 1f1b would place 10000000000 (stage, micro-batch) works; \
         kiln schedules at most 1048576 (for example 64 ranks and 16384 micro-batches; that many \
         take some 10 s and 1.5 GB to verify and simulate)"
    );
    assert!(matches!(
        generate(Kind::DualPipeV, 512, 1025),
        Err(ScheduleError::TooLarge { works: 1_049_600, .. })
    ));
    assert_eq!(
        Kind::parse("gpipe").unwrap_err().to_string(),
        "unknown schedule `gpipe`: the schedules are 1f1b, zb1p, dualpipe, dualpipev"
    );
    assert_eq!(Kind::parse("DualPipeV").unwrap(), Kind::DualPipeV);
    assert_eq!(Costs::new(-1.0, 5.0, 2.0, None, 0.0), Err(CostError::Invalid { name: "F", value: -1.0 }));
    assert!(matches!(Costs::new(3.0, 1.0, 2.0, None, 0.0), Err(CostError::WeightAboveBackward { .. })));
    assert_eq!(Costs::new(3.0, 5.0, 2.0, None, 0.0).unwrap().overlapped, 8.0, "F&B defaults to F + B");
}

#[test]
fn a_schedule_round_trips_through_json() {
    let s = generate(Kind::DualPipeV, 2, 4).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains(r#""forward_backward":{"forward":"#), "{json}");
    let back: Schedule = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn stage_costs_that_are_all_equal_simulate_as_the_uniform_costs() {
    for kind in Kind::ALL {
        for pp in [2, 4] {
            let s = generate(kind, pp, kind.min_micro_batches(pp).max(2 * pp)).unwrap();
            let uniform = Costs::new(F, B, W, None, 0.5).unwrap();
            let stages = vec![StageCost { forward: F, backward: B, weight: W }; s.stages()];
            assert_eq!(
                simulate_stages(&s, &stages, 0.5).unwrap(),
                simulate(&s, &uniform).unwrap(),
                "{kind:?} {pp}"
            );
        }
    }
}

#[test]
fn one_micro_batch_through_uneven_stages_takes_every_forward_then_every_backward() {
    // 1F1B with one micro-batch runs the stages one after another, down and back up: the makespan
    // is the sum of the forwards and of the full backwards, whatever their split.
    let s = generate(Kind::OneFOneB, 3, 1).unwrap();
    let stages = [
        StageCost { forward: 1.0, backward: 2.0, weight: 1.0 },
        StageCost { forward: 4.0, backward: 8.0, weight: 3.0 },
        StageCost { forward: 2.0, backward: 5.0, weight: 0.0 },
    ];
    let sim = simulate_stages(&s, &stages, 0.0).unwrap();
    assert_eq!(sim.makespan, 7.0 + 15.0);
    // Rank 1 computes its 4 + 8 and idles for the rest.
    assert_eq!((sim.ranks[1].busy, sim.ranks[1].bubble), (12.0, 10.0));
    // ZB1P splits the backward: the input gradients go back up (B - W each: 5, 5, 1) and each rank
    // then runs its W; rank 1's W (3) ends last, at 7 + 5 + 5 + 3, after rank 0's at 7 + 5 + 5 + 1 + 1.
    let z = simulate_stages(&generate(Kind::Zb1p, 3, 1).unwrap(), &stages, 0.0).unwrap();
    assert_eq!(z.makespan, 20.0);
    assert_eq!(z.ranks[0].last_end, 19.0);
}

#[test]
fn stage_costs_must_fit_the_schedule() {
    let s = generate(Kind::DualPipeV, 2, 4).unwrap();
    let c = StageCost { forward: 1.0, backward: 2.0, weight: 1.0 };
    assert_eq!(
        simulate_stages(&s, &[c; 2], 0.0).unwrap_err().to_string(),
        "2 stage costs for a schedule of 4 stages: give one per stage"
    );
    let bad = StageCost { weight: 3.0, ..c };
    assert!(matches!(
        simulate_stages(&s, &[c, c, bad, c], 0.0),
        Err(SimulateError::StageCost { stage: 2, source: CostError::WeightAboveBackward { .. } })
    ));
}
