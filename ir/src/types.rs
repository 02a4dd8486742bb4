//! Element types, symbolic dimensions and tensor types.
//!
//! A dimension is either a constant or a monomial over the three symbolic sizes every model graph is
//! written against: `B` (sequences in the batch), `T` (new tokens per sequence in this step) and `S`
//! (context length: cached plus new tokens). A monomial such as `8*B*T` is what a MoE dispatch buffer
//! needs (every token sent to eight experts); anything more general is not needed by the ops kiln has.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 E4M3 as in `torch.float8_e4m3fn`: no infinities, one NaN pattern per sign, max 448.
    F8E4M3,
    I64,
    I32,
    /// Truth values, stored one per byte.
    Bool,
}

impl DType {
    pub const ALL: [DType; 7] =
        [DType::F32, DType::F16, DType::BF16, DType::F8E4M3, DType::I64, DType::I32, DType::Bool];

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// The spelling used in the text IR and in model specs.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One of the symbolic sizes a graph is written against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sym {
    /// Sequences in the batch.
    B,
    /// New tokens per sequence in this step (the prompt length in prefill, 1 in decode).
    T,
    /// Context length seen by attention: cached tokens plus the new ones.
    S,
}

impl Sym {
    pub const ALL: [Sym; 3] = [Sym::B, Sym::T, Sym::S];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Sym::B => "B",
            Sym::T => "T",
            Sym::S => "S",
        }
    }
}

/// Concrete values for the symbolic sizes, used to evaluate a [`Dim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymBindings {
    pub b: u64,
    pub t: u64,
    pub s: u64,
}

impl SymBindings {
    pub fn get(&self, sym: Sym) -> u64 {
        match sym {
            Sym::B => self.b,
            Sym::T => self.t,
            Sym::S => self.s,
        }
    }
}

/// A dimension: `factor * B^eb * T^et * S^es`. Constants have all exponents zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dim {
    factor: u64,
    exps: [u8; 3],
}

impl Dim {
    pub const fn known(n: u64) -> Dim {
        Dim { factor: n, exps: [0; 3] }
    }

    pub const fn sym(s: Sym) -> Dim {
        let mut exps = [0; 3];
        exps[s as usize] = 1;
        Dim { factor: 1, exps }
    }

    pub const B: Dim = Dim::sym(Sym::B);
    pub const T: Dim = Dim::sym(Sym::T);
    pub const S: Dim = Dim::sym(Sym::S);

    /// The value if the dimension is a constant.
    pub fn as_known(self) -> Option<u64> {
        (self.exps == [0; 3]).then_some(self.factor)
    }

    pub fn is_symbolic(self) -> bool {
        self.exps != [0; 3]
    }

    /// Whether the symbol `s` appears in the dimension (`8*B*T` uses `B` and `T`, not `S`).
    pub fn uses(self, s: Sym) -> bool {
        self.exps[s.index()] != 0
    }

    pub fn factor(self) -> u64 {
        self.factor
    }

    /// The product of two dimensions, or `None` if an exponent or the factor would overflow.
    pub fn checked_mul(self, other: Dim) -> Option<Dim> {
        let factor = self.factor.checked_mul(other.factor)?;
        let mut exps = [0u8; 3];
        for (i, e) in exps.iter_mut().enumerate() {
            *e = self.exps[i].checked_add(other.exps[i])?;
        }
        Some(Dim::canonical(factor, exps))
    }

    /// `self / other` when it is exact (same or larger exponents and a dividing factor).
    pub fn checked_div(self, other: Dim) -> Option<Dim> {
        if other.factor == 0 || self.factor % other.factor != 0 {
            return None;
        }
        let mut exps = [0u8; 3];
        for (i, e) in exps.iter_mut().enumerate() {
            *e = self.exps[i].checked_sub(other.exps[i])?;
        }
        Some(Dim::canonical(self.factor / other.factor, exps))
    }

    /// A zero factor makes the symbols irrelevant; keep one canonical zero so equality is structural.
    fn canonical(factor: u64, exps: [u8; 3]) -> Dim {
        if factor == 0 {
            Dim::known(0)
        } else {
            Dim { factor, exps }
        }
    }

    /// Evaluates the dimension for concrete sizes; `None` on overflow.
    pub fn eval(self, bind: &SymBindings) -> Option<u64> {
        let mut v = self.factor;
        for s in Sym::ALL {
            for _ in 0..self.exps[s.index()] {
                v = v.checked_mul(bind.get(s))?;
            }
        }
        Some(v)
    }

    /// Parses the text form: `7168`, `T`, `8*B*T`, `B*B`.
    pub fn parse(text: &str) -> Option<Dim> {
        let mut d = Dim::known(1);
        for part in text.split('*') {
            let part = part.trim();
            let f = match part {
                "B" => Dim::B,
                "T" => Dim::T,
                "S" => Dim::S,
                _ if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => {
                    Dim::known(part.parse().ok()?)
                }
                _ => return None,
            };
            d = d.checked_mul(f)?;
        }
        Some(d)
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::known(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_symbolic() {
            return write!(f, "{}", self.factor);
        }
        let mut first = true;
        if self.factor != 1 {
            write!(f, "{}", self.factor)?;
            first = false;
        }
        for s in Sym::ALL {
            for _ in 0..self.exps[s.index()] {
                if !first {
                    f.write_str("*")?;
                }
                f.write_str(s.name())?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The shape of a tensor, outermost dimension first.
pub type Shape = Vec<Dim>;

/// Element type and shape of a value. Written `bf16[B, T, 7168]`; a scalar is `f32[]`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl IntoIterator<Item = Dim>) -> TensorType {
        TensorType { dtype, shape: shape.into_iter().collect() }
    }

    /// A tensor whose dimensions are all constants.
    pub fn known(dtype: DType, dims: &[u64]) -> TensorType {
        TensorType::new(dtype, dims.iter().map(|&d| Dim::known(d)))
    }

    pub fn scalar(dtype: DType) -> TensorType {
        TensorType { dtype, shape: Vec::new() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType { dtype, shape: self.shape.clone() }
    }

    pub fn with_shape(&self, shape: Shape) -> TensorType {
        TensorType { dtype: self.dtype, shape }
    }

    /// Number of elements when every dimension is a constant.
    pub fn known_numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(d.as_known()?))
    }

    /// Number of elements as a dimension (a monomial), `None` on overflow.
    pub fn numel(&self) -> Option<Dim> {
        self.shape.iter().try_fold(Dim::known(1), |acc, &d| acc.checked_mul(d))
    }

    /// Number of elements for concrete sizes.
    pub fn eval_numel(&self, bind: &SymBindings) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(d.eval(bind)?))
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Debug for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print_and_parse() {
        let d = Dim::known(8).checked_mul(Dim::B).unwrap().checked_mul(Dim::T).unwrap();
        assert_eq!(d.to_string(), "8*B*T");
        assert_eq!(Dim::parse("8*B*T"), Some(d));
        assert_eq!(Dim::parse("T*8*B"), Some(d));
        assert_eq!(Dim::parse("7168"), Some(Dim::known(7168)));
        assert_eq!(Dim::parse("B*B").unwrap().to_string(), "B*B");
        assert_eq!(Dim::parse("Q"), None);
        assert_eq!(Dim::parse(""), None);
        assert_eq!(Dim::parse("2**T"), None);
    }

    #[test]
    fn dims_divide_and_evaluate() {
        let d = Dim::parse("8*B*T").unwrap();
        assert_eq!(d.checked_div(Dim::known(8)), Dim::parse("B*T"));
        assert_eq!(d.checked_div(Dim::S), None);
        assert_eq!(d.checked_div(Dim::known(3)), None);
        let bind = SymBindings { b: 2, t: 5, s: 9 };
        assert_eq!(d.eval(&bind), Some(80));
        assert_eq!(Dim::known(0).checked_mul(Dim::T), Some(Dim::known(0)));
        assert!(d.uses(Sym::B) && d.uses(Sym::T) && !d.uses(Sym::S));
    }

    #[test]
    fn tensor_types_print() {
        let t = TensorType::new(DType::BF16, [Dim::B, Dim::T, Dim::known(7168)]);
        assert_eq!(t.to_string(), "bf16[B, T, 7168]");
        assert_eq!(TensorType::scalar(DType::F32).to_string(), "f32[]");
        assert_eq!(t.known_numel(), None);
        assert_eq!(TensorType::known(DType::F32, &[3, 4]).known_numel(), Some(12));
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
    }
}
