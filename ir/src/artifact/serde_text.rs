//! Serde for the manifest's text-valued fields: dimensions, shapes and sizes as they are written in
//! the text IR (`"8*B*T"`, `["B", "T", "7168"]`, `"B"`), and program kinds and state roles by the
//! names the `.kir` format gives them.

use crate::module::{ProgramKind, StateRole};
use crate::types::Sym;

/// Serde for a [`Dim`](crate::Dim) as its text form (`"8*B*T"`).
pub mod dim {
    use crate::types::Dim;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Dim, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dim, D::Error> {
        let text = String::deserialize(d)?;
        Dim::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a dimension")))
    }
}

/// Serde for a shape as a list of dimension texts (`["B", "T", "7168"]`).
pub mod dims {
    use crate::types::Dim;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dims: &[Dim], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(dims.len()))?;
        for d in dims {
            seq.serialize_element(&d.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Dim>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| {
                Dim::parse(t).ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not a dimension")))
            })
            .collect()
    }
}

fn sym_from_name(name: &str) -> Option<Sym> {
    Sym::ALL.into_iter().find(|s| s.name() == name)
}

/// Serde for a [`Sym`] as `"B"`, `"T"` or `"S"`.
pub mod sym {
    use super::sym_from_name;
    use crate::types::Sym;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sym: &Sym, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(sym.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Sym, D::Error> {
        let text = String::deserialize(d)?;
        sym_from_name(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not B, T or S")))
    }
}

/// Serde for a list of [`Sym`]s.
pub mod syms {
    use super::sym_from_name;
    use crate::types::Sym;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(syms: &[Sym], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(syms.len()))?;
        for sym in syms {
            seq.serialize_element(sym.name())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Sym>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| {
                sym_from_name(t).ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not B, T or S")))
            })
            .collect()
    }
}

/// Serde for a [`ProgramKind`] by its name (`prefill`).
pub mod kind {
    use super::ProgramKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &ProgramKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ProgramKind, D::Error> {
        let text = String::deserialize(d)?;
        ProgramKind::from_name(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a program kind")))
    }
}

/// Serde for a [`StateRole`] by its name (`kv_cache`).
pub mod role {
    use super::StateRole;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &StateRole, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StateRole, D::Error> {
        let text = String::deserialize(d)?;
        StateRole::from_name(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a state role")))
    }
}
