//! The interpreter's tensors: a concrete shape, a dtype and row-major data.
//!
//! Float tensors of every width are stored as f32 values that are exactly representable in the
//! dtype (bf16, f16 and f8e4m3 values all are), so arithmetic never has to decode anything and the
//! rounding to the dtype happens once, when a tensor is made. Integer tensors (i32 and i64) are
//! stored as i64, booleans as `bool`.

use crate::types::{DType, Dim, TensorType};

use super::numerics::round_to_dtype;

/// The elements of a [`Tensor`], row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// f32, f16, bf16 and f8e4m3, each value already rounded to the dtype.
    Float(Vec<f32>),
    /// i32 and i64; i32 values are within the i32 range.
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Float(v) => v.len(),
            Data::Int(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empty data of the same kind, with room for `cap` elements.
    pub(crate) fn empty_like(&self, cap: usize) -> Data {
        match self {
            Data::Float(_) => Data::Float(Vec::with_capacity(cap)),
            Data::Int(_) => Data::Int(Vec::with_capacity(cap)),
            Data::Bool(_) => Data::Bool(Vec::with_capacity(cap)),
        }
    }

    /// Appends `other[range]`; both are of the same kind (same dtype).
    pub(crate) fn extend_from(&mut self, other: &Data, range: std::ops::Range<usize>) {
        match (self, other) {
            (Data::Float(a), Data::Float(b)) => a.extend_from_slice(&b[range]),
            (Data::Int(a), Data::Int(b)) => a.extend_from_slice(&b[range]),
            (Data::Bool(a), Data::Bool(b)) => a.extend_from_slice(&b[range]),
            _ => unreachable!("operands of one dtype have data of one kind"),
        }
    }
}

/// A tensor with a concrete shape. See the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<u64>,
    dtype: DType,
    data: Data,
}

/// Why a tensor could not be made from the given parts.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} holds {want} elements, found {found}")]
    Length { shape: Vec<u64>, want: String, found: usize },
    #[error("{constructor} cannot make a tensor of dtype {dtype}")]
    DType { constructor: &'static str, dtype: DType },
    #[error("{value} is out of range for {dtype}")]
    OutOfRange { value: i64, dtype: DType },
}

/// The number of elements of `shape`, if it fits in memory at all.
fn element_count(shape: &[u64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

fn check_len(shape: &[u64], len: usize) -> Result<(), TensorError> {
    match element_count(shape) {
        Some(n) if n == len => Ok(()),
        n => Err(TensorError::Length {
            shape: shape.to_vec(),
            want: n.map_or("too many".to_string(), |n| n.to_string()),
            found: len,
        }),
    }
}

impl Tensor {
    /// A float tensor; each value is rounded to `dtype` (round to nearest even, see
    /// [`super::numerics`]).
    pub fn from_f32(dtype: DType, shape: impl Into<Vec<u64>>, data: Vec<f32>) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        if !dtype.is_float() {
            return Err(TensorError::DType { constructor: "from_f32", dtype });
        }
        check_len(&shape, data.len())?;
        Ok(Tensor::float(dtype, shape, data))
    }

    /// An integer tensor (i32 or i64); i32 values must fit in 32 bits.
    pub fn from_i64(dtype: DType, shape: impl Into<Vec<u64>>, data: Vec<i64>) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        if !dtype.is_int() {
            return Err(TensorError::DType { constructor: "from_i64", dtype });
        }
        check_len(&shape, data.len())?;
        if dtype == DType::I32 {
            if let Some(&value) = data.iter().find(|&&v| i32::try_from(v).is_err()) {
                return Err(TensorError::OutOfRange { value, dtype });
            }
        }
        Ok(Tensor { shape, dtype, data: Data::Int(data) })
    }

    /// A boolean tensor.
    pub fn from_bool(shape: impl Into<Vec<u64>>, data: Vec<bool>) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        check_len(&shape, data.len())?;
        Ok(Tensor { shape, dtype: DType::Bool, data: Data::Bool(data) })
    }

    /// A float tensor from values the caller has just computed; rounds them to `dtype`. The length
    /// must match the shape (the interpreter's ops compute both).
    pub(crate) fn float(dtype: DType, shape: Vec<u64>, mut data: Vec<f32>) -> Tensor {
        debug_assert!(dtype.is_float());
        debug_assert_eq!(element_count(&shape), Some(data.len()));
        if dtype != DType::F32 {
            for v in &mut data {
                *v = round_to_dtype(dtype, *v);
            }
        }
        Tensor { shape, dtype, data: Data::Float(data) }
    }

    /// An integer tensor whose values the caller has computed within the dtype's range.
    pub(crate) fn int(dtype: DType, shape: Vec<u64>, data: Vec<i64>) -> Tensor {
        debug_assert!(dtype.is_int());
        debug_assert_eq!(element_count(&shape), Some(data.len()));
        Tensor { shape, dtype, data: Data::Int(data) }
    }

    /// A tensor from data already in the dtype's representation (moved or selected from another
    /// tensor of the same dtype).
    pub(crate) fn with_data(dtype: DType, shape: Vec<u64>, data: Data) -> Tensor {
        debug_assert_eq!(element_count(&shape), Some(data.len()));
        Tensor { shape, dtype, data }
    }

    /// The elements at flat indices `idx`, as a tensor of the same dtype and the given shape.
    pub(crate) fn select(&self, shape: Vec<u64>, idx: impl IntoIterator<Item = usize>) -> Tensor {
        let idx = idx.into_iter();
        let data = match &self.data {
            Data::Float(v) => Data::Float(idx.map(|i| v[i]).collect()),
            Data::Int(v) => Data::Int(idx.map(|i| v[i]).collect()),
            Data::Bool(v) => Data::Bool(idx.map(|i| v[i]).collect()),
        };
        Tensor::with_data(self.dtype, shape, data)
    }

    /// Same data under another shape with the same element count.
    pub(crate) fn reshaped(mut self, shape: Vec<u64>) -> Tensor {
        debug_assert_eq!(element_count(&shape), Some(self.numel()));
        self.shape = shape;
        self
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    pub fn into_data(self) -> Data {
        self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The values of a float tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The values of an integer tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::Int(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The tensor's type, with every dimension known.
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype, self.shape.iter().map(|&d| Dim::known(d)))
    }

    /// The shape as `usize`s (every dimension fits: the data is in memory).
    pub(crate) fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }
}

/// Row-major strides of `dims`.
pub(crate) fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// The flat source index of every element of a tensor of shape `out`, in row-major order, when
/// moving one step along output axis `d` moves `st[d]` elements in the source. Transposes,
/// broadcasts and reductions are all this with different strides.
pub(crate) fn strided_index(out: &[usize], st: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let mut res = Vec::with_capacity(n);
    let mut idx = vec![0usize; out.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        res.push(cur);
        // Advance the odometer over the output's axes, keeping `cur` in step.
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            cur += st[d];
            if idx[d] < out[d] {
                break;
            }
            cur -= st[d] * out[d];
            idx[d] = 0;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_round_and_check() {
        let t = Tensor::from_f32(DType::BF16, [2], vec![1.0 + 2f32.powi(-9), 3.0]).unwrap();
        assert_eq!(t.as_f32(), Some(&[1.0, 3.0][..]));
        assert_eq!(t.ty().to_string(), "bf16[2]");
        assert_eq!(
            Tensor::from_f32(DType::F32, [2, 2], vec![1.0]).unwrap_err().to_string(),
            "shape [2, 2] holds 4 elements, found 1"
        );
        assert!(matches!(
            Tensor::from_f32(DType::I32, [1], vec![1.0]),
            Err(TensorError::DType { constructor: "from_f32", dtype: DType::I32 })
        ));
        assert_eq!(
            Tensor::from_i64(DType::I32, [1], vec![1 << 40]).unwrap_err(),
            TensorError::OutOfRange { value: 1 << 40, dtype: DType::I32 }
        );
        let i = Tensor::from_i64(DType::I64, [3], vec![1 << 40, -2, 0]).unwrap();
        assert_eq!(i.as_i64(), Some(&[1 << 40, -2, 0][..]));
        assert_eq!(i.as_f32(), None);
        assert_eq!(Tensor::from_f32(DType::F32, [], vec![2.5]).unwrap().numel(), 1);
        assert!(Tensor::from_bool([u64::MAX, 4], vec![]).is_err());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
        // A 2x3 matrix read as its 3x2 transpose.
        assert_eq!(strided_index(&[3, 2], &[1, 3]), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(strided_index(&[], &[]), vec![0]);
    }
}
