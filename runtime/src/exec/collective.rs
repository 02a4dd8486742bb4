//! A program's collective steps (`all_reduce`, `all_gather`) among its launches: started as soon as the launch before them is
//! done, finished just before the first launch that reads their result, so that the sum over the
//! peers travels while the launches between compute (a data-parallel step's gradient sums start
//! during the backward pass: the compiler orders each one right after its operand, see
//! `kiln_ir::Graph::nodes`).
//!
//! [`plan`] groups the steps at load by the launch they follow (a *bucket*: the steps of one group
//! go as one message, their values laid end to end) and finds each bucket's *due* launch. At run
//! time [`start`] reads the sources and starts the message ([`Communicator::start_all_reduce_sum`]),
//! every later launch lets the messages in flight progress ([`progress`]: MPI moves a non-blocking
//! message only inside its calls), and [`finish`] waits for a bucket and writes its results when its
//! due launch comes (or at the end of the run). The memory plan keeps a result's arena bytes from
//! the step that defines it to its last reader, so writing them late is safe; a source is read when
//! the message starts, so its bytes may be reused at once.
//!
//! A process alone (no communicator, or a group of one) copies each source to its result at once; a
//! gather compiled for more processes than the run has is refused.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use kiln_ir::artifact::{Buffer, Program, Step, Storage};
use kiln_ir::{DType, SymBindings};

use super::{watch, Backend};
use crate::comm::{
    CommStats, Communicator, DeviceCollectives, DeviceKind, DeviceMessage, DevicePart, InFlight,
};
use crate::host::{decode, encode};
use crate::weights::HostData;
use crate::RuntimeError;

/// The all-reduce steps of one program, by where they start.
#[derive(Default)]
pub(super) struct Collectives {
    pub before: Option<Bucket>,
    /// By the position (in the bound launches) of the launch they follow.
    pub after: HashMap<usize, Bucket>,
    /// Each buffer's root: itself, or the buffer it is an alias of.
    root: Vec<usize>,
}

/// Consecutive all-reduce steps, and the first bound launch (by position) that reads a result of
/// one of them; `None`: no launch does (an output), so they finish at the end of the run.
pub(super) struct Bucket {
    pub steps: Vec<usize>,
    pub due: Option<usize>,
}

/// Groups the all-reduce steps of `p` by the launch before them; `launches` are the step indices of
/// the bound launches, in order.
pub(super) fn plan(p: &Program, launches: &[usize]) -> Collectives {
    let mut root: Vec<usize> = (0..p.buffers.len()).collect();
    for s in &p.steps {
        if let Step::Alias { buffer, source } = s {
            root[buffer.index()] = root[source.index()];
        }
    }
    let reads = |s: &Step, r: usize| match s {
        Step::Launch { buffers, .. } => buffers.iter().any(|b| root[b.index()] == r),
        Step::AllReduce { source, .. } | Step::AllGather { source, .. } => root[source.index()] == r,
        Step::AllToAll { source, keep, .. } => {
            root[source.index()] == r || keep.is_some_and(|k| root[k.index()] == r)
        }
        Step::Send { buffer, .. } => root[buffer.index()] == r,
        Step::Alias { .. } | Step::Recv { .. } => false,
    };
    // The first bound launch, by position, at or after step `from`.
    let position_from = |from: usize| launches.iter().position(|&l| l >= from);
    let mut out = Collectives { root: root.clone(), ..Collectives::default() };
    let mut last_launch: Option<usize> = None;
    for (i, s) in p.steps.iter().enumerate() {
        match s {
            Step::Launch { .. } => {
                if let Some(pos) = launches.iter().position(|&l| l == i) {
                    last_launch = Some(pos);
                }
            }
            Step::AllReduce { buffer, .. }
            | Step::AllGather { buffer, .. }
            | Step::AllToAll { buffer, .. } => {
                let r = root[buffer.index()];
                // The first later step that reads the result; a collective reading it must find
                // it written before it starts, i.e. before the launch after the one it follows.
                let due =
                    (i + 1..p.steps.len()).find(|&j| reads(&p.steps[j], r)).and_then(|j| match p.steps[j] {
                        Step::Launch { .. } => position_from(j),
                        _ => {
                            let before = (0..j).rev().find(|&k| launches.contains(&k));
                            before.and_then(|k| launches.iter().position(|&l| l == k)).map(|pos| pos + 1)
                        }
                    });
                let bucket = match last_launch {
                    None => out.before.get_or_insert(Bucket { steps: Vec::new(), due: None }),
                    Some(l) => out.after.entry(l).or_insert(Bucket { steps: Vec::new(), due: None }),
                };
                bucket.steps.push(i);
                bucket.due = match (bucket.due, due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Step::Alias { .. } | Step::Send { .. } | Step::Recv { .. } => {}
        }
    }
    out
}

/// A run of a program, as its collectives see it: the program, its collectives' plan, the sizes it
/// runs at, the communicator, if any, and the device transport, if any.
#[derive(Clone, Copy)]
pub(super) struct Run<'a> {
    pub program: &'a Program,
    pub cs: &'a Collectives,
    pub sizes: &'a SymBindings,
    pub comm: Option<&'a dyn Communicator>,
    pub device: Option<&'a dyn DeviceCollectives>,
}

/// One message in flight: its results' places, and when it started and was found done.
pub(super) struct Flight {
    parts: Vec<(Range<usize>, Place, usize)>,
    /// The roots of the buffers it writes, which a later collective may read.
    results: Vec<usize>,
    inflight: Box<dyn InFlight>,
    group: String,
    /// For a gather: the group's size and the width of one process's message; each part's result
    /// is its range taken from every process's message in turn.
    gather: Option<(usize, usize)>,
    pub due: Option<usize>,
    start: Instant,
    done: Option<Instant>,
    bytes: u64,
    /// An all-to-all's rows for other processes: sent, and all of them.
    rows: (u64, u64),
    /// Nanoseconds its start took (an all-to-all's exchange of flags).
    start_ns: u64,
}

/// Where a buffer's bytes are: the arena at an offset, or a state.
#[derive(Clone)]
enum Place {
    Arena(usize),
    State(String),
}

fn place(b: &Buffer, group: &str, step: usize) -> Result<Place, RuntimeError> {
    match &b.storage {
        Storage::Arena { offset } => Ok(Place::Arena(*offset as usize)),
        Storage::State { name } => Ok(Place::State(name.clone())),
        _ => Err(RuntimeError::Collective {
            group: group.to_string(),
            what: format!("step {step} reads or writes {}, which is not in the arena or a state", b.value),
        }),
    }
}

fn read<B: Backend>(
    be: &B,
    mem: &watch::Memories<'_, B>,
    at: &Place,
    n: usize,
) -> Result<Vec<u8>, RuntimeError> {
    match at {
        Place::Arena(o) => be.read(mem.arena, *o..*o + n),
        Place::State(name) => be.read(&mem.states[name], 0..n),
    }
}

/// The device address of `at`.
fn address<B: Backend>(be: &B, mem: &watch::Memories<'_, B>, at: &Place) -> u64 {
    match at {
        Place::Arena(o) => be.address(mem.arena) + *o as u64,
        Place::State(name) => be.address(&mem.states[name]),
    }
}

fn write<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    at: &Place,
    bytes: &[u8],
) -> Result<(), RuntimeError> {
    match at {
        Place::Arena(o) => be.write(mem.arena, *o, bytes),
        Place::State(name) => {
            be.write(mem.states.get_mut(name).expect("every declared state is allocated"), 0, bytes)
        }
    }
}

/// What a step does: sum, gather from `size` processes, or exchange blocks with them (one
/// message per step: blocks of several steps would interleave).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sum,
    Gather(u64),
    Exchange(u64),
}

/// The buffers collective step `s` reads.
fn sources(s: &Step) -> Vec<kiln_ir::artifact::BufferId> {
    match s {
        Step::AllReduce { source, .. } | Step::AllGather { source, .. } => vec![*source],
        Step::AllToAll { source, keep, .. } => [Some(*source), *keep].into_iter().flatten().collect(),
        _ => Vec::new(),
    }
}

/// Finishes the flights in `flights` that write a buffer one of `steps` reads: a collective reads
/// its operands when it starts, so one that reads another's result waits for it.
fn finish_read<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    program: &Program,
    cs: &Collectives,
    steps: &[usize],
    flights: &mut Vec<Flight>,
    stats: &mut CommStats,
) -> Result<(), RuntimeError> {
    let read: Vec<usize> =
        steps.iter().flat_map(|&s| sources(&program.steps[s])).map(|b| cs.root[b.index()]).collect();
    finish_due(be, mem, flights, |f| f.results.iter().any(|r| read.contains(r)), stats)
}

fn kind_of(s: &Step) -> Option<(&str, Kind, kiln_ir::artifact::BufferId, kiln_ir::artifact::BufferId)> {
    match s {
        Step::AllReduce { buffer, source, group } => Some((group, Kind::Sum, *buffer, *source)),
        Step::AllGather { buffer, source, group, size } => {
            Some((group, Kind::Gather(*size), *buffer, *source))
        }
        Step::AllToAll { buffer, source, group, size, .. } => {
            Some((group, Kind::Exchange(*size), *buffer, *source))
        }
        _ => None,
    }
}

/// The steps of `bucket` that are collectives of `group` and `kind`, in order: each step's index,
/// its result and its source.
fn members<'a>(
    program: &'a Program,
    bucket: &'a Bucket,
    group: &'a str,
    kind: Kind,
) -> impl Iterator<Item = (usize, kiln_ir::artifact::BufferId, kiln_ir::artifact::BufferId)> + 'a {
    bucket.steps.iter().filter_map(move |&s| match kind_of(&program.steps[s]) {
        Some((g, k, buffer, source)) if (g, k) == (group, kind) => Some((s, buffer, source)),
        _ => None,
    })
}

/// Starts bucket `bucket` of `program` at `sizes`, once every launch issued so far is done, adding
/// its messages to `flights`: one message per group and kind (an all-to-all per step), or, alone,
/// each result written at once. A step that reads the result of a message in `flights` waits for
/// that message first.
pub(super) fn start<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    run: &Run<'_>,
    bucket: &Bucket,
    flights: &mut Vec<Flight>,
    stats: &mut CommStats,
) -> Result<(), RuntimeError> {
    let Run { program, cs, sizes, comm, device } = *run;
    // A message the device transport carries: its group is one it has, of more than one process,
    // and every value is an f32 in the arena or a state.
    let on_device = |group: &str, kind: Kind| -> Result<bool, RuntimeError> {
        let Some(d) = device else { return Ok(false) };
        if !d.has_group(group) || crate::comm::group_size(comm, group)? <= 1 {
            return Ok(false);
        }
        Ok(members(program, bucket, group, kind).all(|(_, buffer, source)| {
            [buffer, source].iter().all(|&b| {
                let b = program.buffer(b);
                b.dtype == DType::F32 && matches!(b.storage, Storage::Arena { .. } | Storage::State { .. })
            })
        }))
    };
    let mut host = false;
    for &s in &bucket.steps {
        if let Some((group, kind, ..)) = kind_of(&program.steps[s]) {
            host |= matches!(kind, Kind::Exchange(_)) || !on_device(group, kind)?;
        }
    }
    // The host reads sources once every launch issued so far is done; the device transport
    // queues its copies after them.
    if host {
        be.synchronize()?;
    }
    let mut messages: Vec<(&str, Kind)> = Vec::new();
    for &s in &bucket.steps {
        match kind_of(&program.steps[s]) {
            Some((..)) if matches!(program.steps[s], Step::AllToAll { .. }) => {
                finish_read(be, mem, program, cs, &[s], flights, stats)?;
                let root = |b: kiln_ir::artifact::BufferId| cs.root[b.index()];
                let results = kind_of(&program.steps[s]).map(|(.., b, _)| root(b)).into_iter().collect();
                flights.extend(exchange(be, mem, program, s, bucket.due, sizes, comm, results)?);
            }
            Some((group, kind, ..)) if !messages.contains(&(group, kind)) => messages.push((group, kind)),
            _ => {}
        }
    }
    let batched: Vec<usize> = bucket
        .steps
        .iter()
        .copied()
        .filter(|&s| !matches!(program.steps[s], Step::AllToAll { .. }))
        .collect();
    finish_read(be, mem, program, cs, &batched, flights, stats)?;
    for (group, kind) in messages {
        let peers = crate::comm::group_size(comm, group)?;
        if let Kind::Gather(size) = kind {
            if size as usize != peers {
                return Err(RuntimeError::Collective {
                    group: group.to_string(),
                    what: format!(
                        "the program gathers from {size} processes and this run has {peers}: run it under \
                         `mpirun -n {size}` with --dp {size}"
                    ),
                });
            }
        }
        if on_device(group, kind)? {
            let d = device.expect("on_device checked it");
            let mut msg = DeviceMessage {
                group: group.to_string(),
                kind: match kind {
                    Kind::Gather(size) => DeviceKind::Gather { size: size as usize },
                    Kind::Sum | Kind::Exchange(_) => DeviceKind::Sum,
                },
                parts: Vec::new(),
            };
            let mut results = Vec::new();
            for (s, buffer, source) in members(program, bucket, group, kind) {
                let (src, dst): (&Buffer, &Buffer) = (program.buffer(source), program.buffer(buffer));
                let bytes = src.bytes(sizes).unwrap_or(0) as usize;
                let (from, to) = (place(src, group, s)?, place(dst, group, s)?);
                msg.parts.push(DevicePart {
                    src: address(be, mem, &from),
                    dst: address(be, mem, &to),
                    bytes,
                });
                results.push(cs.root[buffer.index()]);
            }
            let inflight = d.start(&msg)?;
            flights.push(Flight {
                parts: Vec::new(),
                results,
                inflight,
                group: group.to_string(),
                gather: None,
                due: bucket.due,
                start: Instant::now(),
                done: None,
                bytes: msg.bytes() as u64,
                rows: (0, 0),
                start_ns: 0,
            });
            continue;
        }
        let mut values: Vec<f32> = Vec::new();
        let mut parts = Vec::new();
        let mut results = Vec::new();
        for (s, buffer, source) in members(program, bucket, group, kind) {
            let (src, dst): (&Buffer, &Buffer) = (program.buffer(source), program.buffer(buffer));
            let n = src.bytes(sizes).unwrap_or(0) as usize;
            let bytes = read(be, mem, &place(src, group, s)?, n)?;
            let to = place(dst, group, s)?;
            if peers <= 1 {
                // A group of one: the sum, or the stack of one, is the value, copied as it is.
                write(be, mem, &to, &bytes)?;
                continue;
            }
            results.push(cs.root[buffer.index()]);
            let begin = values.len();
            match decode(DType::F32, &bytes) {
                HostData::F32(v) => values.extend(v),
                HostData::I64(v) => values.extend(v.into_iter().map(|x| x as f32)),
            }
            let out = match kind {
                Kind::Sum | Kind::Exchange(_) => n,
                Kind::Gather(size) => n * size as usize,
            };
            parts.push((begin..values.len(), to, out));
        }
        if let (Some(c), true) = (comm, peers > 1) {
            let bytes = 4 * values.len() as u64;
            let width = values.len();
            let inflight = match kind {
                Kind::Sum | Kind::Exchange(_) => c.start_all_reduce_sum(group, values)?,
                Kind::Gather(_) => c.start_all_gather(group, values)?,
            };
            let gather = match kind {
                Kind::Sum | Kind::Exchange(_) => None,
                Kind::Gather(size) => Some((size as usize, width)),
            };
            flights.push(Flight {
                parts,
                results,
                inflight,
                group: group.to_string(),
                gather,
                due: bucket.due,
                start: Instant::now(),
                done: None,
                bytes,
                rows: (0, 0),
                start_ns: 0,
            });
        }
    }
    Ok(())
}

/// Starts all-to-all step `s` of `program` (one message of its own), or, alone, writes its result
/// at once: the source with the rows not kept zeroed.
#[allow(clippy::too_many_arguments)]
fn exchange<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    program: &Program,
    s: usize,
    due: Option<usize>,
    sizes: &SymBindings,
    comm: Option<&dyn Communicator>,
    results: Vec<usize>,
) -> Result<Option<Flight>, RuntimeError> {
    let Step::AllToAll { buffer, source, keep, group, size } = &program.steps[s] else {
        return Ok(None);
    };
    let peers = crate::comm::group_size(comm, group)?;
    if *size as usize != peers {
        return Err(RuntimeError::Collective {
            group: group.to_string(),
            what: format!(
                "the program exchanges tokens between {size} processes and this run has {peers}: run it \
                 under `mpirun` with --ep {size}"
            ),
        });
    }
    let f32s = |b: &Buffer, at: Place| -> Result<Vec<f32>, RuntimeError> {
        let bytes = read(be, mem, &at, b.bytes(sizes).unwrap_or(0) as usize)?;
        Ok(match decode(DType::F32, &bytes) {
            HostData::F32(v) => v,
            HostData::I64(v) => v.into_iter().map(|x| x as f32).collect(),
        })
    };
    let (src, dst) = (program.buffer(*source), program.buffer(*buffer));
    let data = f32s(src, place(src, group, s)?)?;
    let flags = match keep {
        Some(k) => f32s(program.buffer(*k), place(program.buffer(*k), group, s)?)?,
        // No flags: each block is one row that always travels.
        None => vec![1.0; peers],
    };
    let to = place(dst, group, s)?;
    let n = dst.bytes(sizes).unwrap_or(0) as usize;
    let width = data.len().checked_div(flags.len()).unwrap_or(0);
    if flags.is_empty() || width * flags.len() != data.len() || flags.len() % peers != 0 {
        return Err(RuntimeError::Collective {
            group: group.to_string(),
            what: format!(
                "step {s}: {} values do not make rows for {} flags in {peers} blocks",
                data.len(),
                flags.len()
            ),
        });
    }
    let (Some(c), true) = (comm, peers > 1) else {
        let v: Vec<f32> = (data.chunks(width.max(1)).zip(&flags))
            .flat_map(|(r, &f)| r.iter().map(move |&v| if f != 0.0 { v } else { 0.0 }))
            .collect();
        let mut out = vec![0u8; n];
        encode(DType::F32, &HostData::F32(v), &mut out)
            .map_err(|what| RuntimeError::Collective { group: group.to_string(), what })?;
        write(be, mem, &to, &out)?;
        return Ok(None);
    };
    // What travels to the other processes: the flagged rows, and one byte of flag per row.
    let me = c.rank_in(group).map_or(0, |(r, _)| r);
    let per_block = flags.len() / peers;
    let sent_rows = (flags.iter().enumerate()).filter(|&(i, &f)| f != 0.0 && i / per_block != me).count();
    let bytes = (4 * width * sent_rows + (peers - 1) * per_block) as u64;
    let began = Instant::now();
    let inflight = c.start_all_to_all(group, data, flags, width)?;
    let start_ns = began.elapsed().as_nanos() as u64;
    Ok(Some(Flight {
        start_ns,
        parts: vec![(0..n / 4, to, n)],
        results,
        inflight,
        group: group.to_string(),
        gather: None,
        due,
        start: Instant::now(),
        done: None,
        bytes,
        rows: (sent_rows as u64, ((peers - 1) * per_block) as u64),
    }))
}

/// Lets every message in flight progress, noting when each is found done.
pub(super) fn progress(flights: &mut [Flight]) -> Result<(), RuntimeError> {
    for f in flights.iter_mut().filter(|f| f.done.is_none()) {
        if f.inflight.test()? {
            f.done = Some(Instant::now());
        }
    }
    Ok(())
}

/// Waits for `f` and writes its results, counting it in `stats`.
pub(super) fn finish<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    f: Flight,
    stats: &mut CommStats,
) -> Result<(), RuntimeError> {
    let waited = Instant::now();
    let values = f.inflight.wait()?;
    let now = Instant::now();
    let done = f.done.unwrap_or(now);
    stats.messages += 1;
    stats.bytes += f.bytes;
    stats.rows_sent += f.rows.0;
    stats.rows_offered += f.rows.1;
    stats.in_flight_ns += (done - f.start).as_nanos() as u64;
    let wait = if f.done.is_none() { (now - waited).as_nanos() as u64 } else { 0 };
    stats.waited_ns += wait;
    if f.rows.1 > 0 {
        stats.exchanges += 1;
        stats.exchange_in_flight_ns += (done - f.start).as_nanos() as u64;
        stats.exchange_waited_ns += wait;
        stats.exchange_start_ns += f.start_ns;
    }
    // A device transport's results are in place already.
    if f.parts.is_empty() {
        return Ok(());
    }
    be.synchronize()?;
    let short = |want: usize| RuntimeError::Collective {
        group: f.group.clone(),
        what: format!("the collective came back with {} values, fewer than {want}", values.len()),
    };
    for (range, to, n) in f.parts {
        let v: Vec<f32> = match f.gather {
            None => values.get(range.clone()).ok_or_else(|| short(range.end))?.to_vec(),
            Some((size, width)) => {
                let mut v = Vec::with_capacity(size * range.len());
                for r in 0..size {
                    let at = r * width;
                    v.extend(
                        values.get(at + range.start..at + range.end).ok_or_else(|| short(at + range.end))?,
                    );
                }
                v
            }
        };
        let mut out = vec![0u8; n];
        encode(DType::F32, &HostData::F32(v), &mut out)
            .map_err(|what| RuntimeError::Collective { group: f.group.clone(), what })?;
        write(be, mem, &to, &out)?;
    }
    Ok(())
}

/// Finishes the flights that `due` says are due, in the order they started.
pub(super) fn finish_due<B: Backend>(
    be: &B,
    mem: &mut watch::Memories<'_, B>,
    flights: &mut Vec<Flight>,
    due: impl Fn(&Flight) -> bool,
    stats: &mut CommStats,
) -> Result<(), RuntimeError> {
    let mut i = 0;
    while i < flights.len() {
        if due(&flights[i]) {
            let f = flights.remove(i);
            finish(be, mem, f, stats)?;
        } else {
            i += 1;
        }
    }
    Ok(())
}
