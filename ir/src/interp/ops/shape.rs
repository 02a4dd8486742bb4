//! Data movement: `embedding`, `gather`, `take_along`, `concat`, `split` and `transpose` (`reshape` and
//! `broadcast` are in the dispatcher and `elementwise`). No arithmetic, so every dtype works and
//! values are copied exactly. Indices out of range are errors (no negative indexing).

use crate::types::TensorType;

use super::{dims, index, ints, udims, OpResult};
use crate::interp::tensor::{strided_index, strides, Tensor};

/// Rows of `table[V, D]` at `ids`.
pub(super) fn embedding(table: &Tensor, ids: &Tensor, out: &TensorType) -> OpResult {
    let td = table.dims();
    let (v, d) = (td[0], td[1]);
    let ids = ints(ids, "ids")?;
    let mut idx = Vec::with_capacity(ids.len() * d);
    for &i in ids {
        let row = index(i, v, "token id")?;
        idx.extend(row * d..(row + 1) * d);
    }
    Ok(vec![table.select(dims(out), idx)])
}

/// `data` indexed along `axis` by `indices`: `out[o, j, i] = data[o, indices[j], i]`.
pub(super) fn gather(data: &Tensor, indices: &Tensor, axis: usize, out: &TensorType) -> OpResult {
    let dd = data.dims();
    let (outer, len, inner) =
        (dd[..axis].iter().product::<usize>(), dd[axis], dd[axis + 1..].iter().product::<usize>());
    let picks: Vec<usize> =
        ints(indices, "indices")?.iter().map(|&i| index(i, len, "index")).collect::<Result<_, _>>()?;
    let mut idx = Vec::with_capacity(outer * picks.len() * inner);
    for o in 0..outer {
        for &p in &picks {
            let start = (o * len + p) * inner;
            idx.extend(start..start + inner);
        }
    }
    Ok(vec![data.select(dims(out), idx)])
}

/// `out[o, j, i] = data[o, indices[o, j, i], i]` with `j` along `axis`: `take_along`, whose
/// indices have data's rank and dimensions except along `axis`.
pub(super) fn take_along(data: &Tensor, indices: &Tensor, axis: usize, out: &TensorType) -> OpResult {
    let dd = data.dims();
    let (len, inner) = (dd[axis], dd[axis + 1..].iter().product::<usize>());
    let n = indices.dims()[axis];
    let idx = ints(indices, "indices")?;
    let mut src = Vec::with_capacity(idx.len());
    for (e, &i) in idx.iter().enumerate() {
        let p = index(i, len, "index")?;
        // Element e sits at (outer o, position along axis, inner rest) of the indices.
        let (o, rest) = (e / (n * inner), e % inner);
        src.push((o * len + p) * inner + rest);
    }
    Ok(vec![data.select(dims(out), src)])
}

pub(super) fn concat(parts: &[&Tensor], axis: usize, out: &TensorType) -> OpResult {
    let od = udims(out);
    let outer: usize = od[..axis].iter().product();
    let inner: usize = od[axis + 1..].iter().product();
    let mut data = parts[0].data().empty_like(od.iter().product());
    for o in 0..outer {
        for p in parts {
            let chunk = p.dims()[axis] * inner;
            data.extend_from(p.data(), o * chunk..(o + 1) * chunk);
        }
    }
    Ok(vec![Tensor::with_data(out.dtype, dims(out), data)])
}

pub(super) fn split(x: &Tensor, axis: usize, outs: &[TensorType]) -> OpResult {
    let xd = x.dims();
    let (outer, len, inner) =
        (xd[..axis].iter().product::<usize>(), xd[axis], xd[axis + 1..].iter().product::<usize>());
    let mut start = 0;
    let mut results = Vec::with_capacity(outs.len());
    for ty in outs {
        let size = udims(ty)[axis];
        let mut idx = Vec::with_capacity(outer * size * inner);
        for o in 0..outer {
            let from = (o * len + start) * inner;
            idx.extend(from..from + size * inner);
        }
        results.push(x.select(dims(ty), idx));
        start += size;
    }
    Ok(results)
}

/// `out` axis `i` is `x` axis `perm[i]`.
pub(super) fn transpose(x: &Tensor, perm: &[usize], out: &TensorType) -> OpResult {
    let xs = strides(&x.dims());
    let st: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    Ok(vec![x.select(dims(out), strided_index(&udims(out), &st))])
}

/// `cache` with slot `positions[b, t]` of sequence `b` replaced by `new[b, t]`; a position outside
/// the cache is an error (compiled code would write out of bounds).
pub(super) fn cache_update(cache: &Tensor, new: &Tensor, positions: &Tensor) -> OpResult {
    let (cd, nd) = (cache.dims(), new.dims());
    let pos = ints(positions, "positions")?;
    let (b, s, t) = (cd[0], cd[1], nd[1]);
    let row: usize = cd[2..].iter().product();
    let mut slot_of = Vec::with_capacity(b * t);
    for (i, &p) in pos.iter().enumerate() {
        if p < 0 || p as usize >= s {
            return Err(format!(
                "cache_update: position {p} of sequence {} is outside the cache of {s} slots",
                i / t.max(1)
            ));
        }
        slot_of.push(p as usize);
    }
    // Later tokens win when two write one slot, as the in-place kernel's order does.
    let mut writer = vec![None; b * s];
    for bi in 0..b {
        for ti in 0..t {
            writer[bi * s + slot_of[bi * t + ti]] = Some(bi * t + ti);
        }
    }
    let mut data = cache.data().empty_like(b * s * row);
    for (slot, w) in writer.iter().enumerate() {
        match w {
            Some(src) => data.extend_from(new.data(), src * row..(src + 1) * row),
            None => data.extend_from(cache.data(), slot * row..(slot + 1) * row),
        }
    }
    Ok(vec![Tensor::with_data(cache.dtype(), cache.shape().to_vec(), data)])
}
