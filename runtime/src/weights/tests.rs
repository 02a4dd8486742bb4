//! Tests of reading, validating, binding and writing checkpoints, on small files built here byte by
//! byte (so that every malformed case is exactly the one named) and on files written by
//! `write_safetensors`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_ir::op::Op;
use kiln_ir::{DType, Dim, Graph, TensorType};
use proptest::prelude::*;

use super::checkpoint::dequantize_blocks;
use super::safetensors::parse_bytes;
use super::*;

/// A fresh directory under the system temp dir, removed on drop (also used by `crate::data`'s tests;
/// the workspace has no temp-dir crate).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-weights-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file from a literal header and data section.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn f32s(name: &str, shape: &[u64], v: Vec<f32>) -> HostTensor {
    HostTensor { name: name.into(), dtype: DType::F32, shape: shape.to_vec(), data: HostData::F32(v) }
}

/// A graph with just these params (no ops: binding looks only at params).
fn graph(params: &[(&str, DType, &[u64])]) -> Graph {
    let mut g = Graph::new("g");
    for &(name, dtype, dims) in params {
        g.add_node(Op::Param { name: name.into() }, &[], vec![TensorType::known(dtype, dims)], None).unwrap();
    }
    g
}

fn parse(bytes: &[u8]) -> Result<Vec<super::safetensors::Entry>, WeightError> {
    parse_bytes(Path::new("t.safetensors"), bytes)
}

#[test]
fn f32_and_int_tensors_round_trip() {
    let dir = TempDir::new("rt32");
    let path = dir.path().join("model.safetensors");
    let tensors = vec![
        f32s("a", &[2, 3], vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e38, -7.25, 1.0 / 3.0]),
        f32s("empty", &[0, 4], vec![]),
        HostTensor {
            name: "ids".into(),
            dtype: DType::I64,
            shape: vec![2],
            data: HostData::I64(vec![-5, 1 << 40]),
        },
        HostTensor { name: "i".into(), dtype: DType::I32, shape: vec![1], data: HostData::I64(vec![-7]) },
        HostTensor {
            name: "m".into(),
            dtype: DType::Bool,
            shape: vec![3],
            data: HostData::I64(vec![1, 0, 1]),
        },
    ];
    write_safetensors(&path, &tensors, StoreFloats::F32).unwrap();
    let ck = open_checkpoint(dir.path()).unwrap();
    assert_eq!(ck.len(), 5);
    assert_eq!(ck.files(), std::slice::from_ref(&path));
    for t in &tensors {
        assert_eq!(&ck.read(&t.name).unwrap(), t);
    }
    let a = ck.get("a").unwrap();
    assert_eq!(
        (a.dtype, a.shape.as_slice(), a.file.as_path()),
        (StDType::F32, &[2u64, 3][..], path.as_path())
    );
    // The header is padded to 8 bytes and carries PyTorch's format tag.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(header["ids"]["dtype"], "I64");
    // Only the file itself is left: the temporary file was renamed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A single file can also be opened by its path.
    assert_eq!(open_checkpoint(&path).unwrap().len(), 5);
}

#[test]
fn a_streamed_write_fetches_each_tensor_once_and_refuses_one_unlike_its_head() {
    let dir = TempDir::new("stream");
    let tensors = vec![
        f32s("b", &[2, 2], vec![1.0, -2.0, 3.5, 0.25]),
        HostTensor { name: "i".into(), dtype: DType::I32, shape: vec![2], data: HostData::I64(vec![-7, 9]) },
        HostTensor { name: "h".into(), dtype: DType::BF16, shape: vec![1], data: HostData::F32(vec![1.5]) },
    ];
    let heads: Vec<TensorHead> = tensors.iter().map(TensorHead::of).collect();
    // Byte for byte the file write_safetensors writes, each tensor fetched once, in order.
    let (whole, streamed) = (dir.path().join("whole.safetensors"), dir.path().join("streamed.safetensors"));
    write_safetensors(&whole, &tensors, StoreFloats::AsDeclared).unwrap();
    let mut asked = Vec::new();
    write_safetensors_streamed(&streamed, &heads, StoreFloats::AsDeclared, |i| {
        asked.push(i);
        Ok(std::borrow::Cow::Owned(tensors[i].clone()))
    })
    .unwrap();
    assert_eq!(asked, [0, 1, 2]);
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&streamed).unwrap());
    // A tensor unlike its head, or one that cannot be fetched, ends the write with its name and
    // leaves no file behind.
    let path = dir.path().join("bad.safetensors");
    let wrong = |i: usize| {
        let mut t = tensors[i].clone();
        if i == 1 {
            t.shape = vec![1, 2];
        }
        Ok(std::borrow::Cow::Owned(t))
    };
    let e =
        write_safetensors_streamed(&path, &heads, StoreFloats::AsDeclared, wrong).unwrap_err().to_string();
    assert!(e.contains("`i`") && e.contains("came as `i` i32[1, 2] where the header says i32[2]"), "{e}");
    let gone = |i: usize| match i {
        2 => Err("the device is gone".to_string()),
        _ => Ok(std::borrow::Cow::Borrowed(&tensors[i])),
    };
    let e = write_safetensors_streamed(&path, &heads, StoreFloats::AsDeclared, gone).unwrap_err().to_string();
    assert!(e.contains("`h`") && e.contains("the device is gone"), "{e}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn bf16_round_trips_with_rounding() {
    let dir = TempDir::new("rtbf16");
    let path = dir.path().join("w.safetensors");
    let x = [1.0f32, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5, 1e-3];
    write_safetensors(&path, &[f32s("x", &[5], x.to_vec())], StoreFloats::BF16).unwrap();
    let t = open_checkpoint(&path).unwrap().read("x").unwrap();
    assert_eq!(t.dtype, DType::BF16);
    let want: Vec<f32> = x.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
    assert_eq!(t.data, HostData::F32(want.clone()));
    assert_eq!(&want[..4], [1.0, 1.0, 1.0 + 2f32.powi(-6), -2.5]);
    // A bf16 tensor written as declared reads back unchanged.
    let back = HostTensor { name: "y".into(), ..t.clone() };
    write_safetensors(&path, std::slice::from_ref(&back), StoreFloats::AsDeclared).unwrap();
    assert_eq!(open_checkpoint(&path).unwrap().read("y").unwrap(), back);
    assert_eq!(open_checkpoint(&path).unwrap().raw("y").unwrap()[..2], f32_to_bf16(1.0).to_le_bytes());
}

#[test]
fn sharded_checkpoints_read_through_the_index() {
    let dir = TempDir::new("shard");
    let d = dir.path();
    write_safetensors(&d.join("s1.safetensors"), &[f32s("a", &[2], vec![1.0, 2.0])], StoreFloats::F32)
        .unwrap();
    let b = vec![f32s("b", &[1], vec![3.0]), f32s("c", &[2, 1], vec![4.0, 5.0])];
    write_safetensors(&d.join("s2.safetensors"), &b, StoreFloats::BF16).unwrap();
    let index = |map: &[(&str, &str)]| {
        let m: BTreeMap<&str, &str> = map.iter().copied().collect();
        serde_json::json!({ "metadata": { "total_size": 14 }, "weight_map": m }).to_string()
    };
    let good = [("a", "s1.safetensors"), ("b", "s2.safetensors"), ("c", "s2.safetensors")];
    write(d, "model.safetensors.index.json", index(&good).as_bytes());
    let ck = open_checkpoint(d).unwrap();
    assert_eq!(ck.files().len(), 2);
    let listed: Vec<(&str, &Path)> = ck.tensors().map(|t| (t.name.as_str(), t.file.as_path())).collect();
    assert_eq!(listed[0], ("a", d.join("s1.safetensors").as_path()));
    assert_eq!(listed[2], ("c", d.join("s2.safetensors").as_path()));
    assert_eq!(ck.read("a").unwrap().data, HostData::F32(vec![1.0, 2.0]));
    assert_eq!(ck.read("c").unwrap().data, HostData::F32(vec![4.0, 5.0]));
    assert_eq!(ck.read("c").unwrap().dtype, DType::BF16);
    assert_eq!(open_checkpoint(&d.join("model.safetensors.index.json")).unwrap().len(), 3);
    assert!(matches!(ck.read("z"), Err(WeightError::NoSuchTensor { .. })));

    let open_with = |map: &[(&str, &str)]| {
        write(d, "model.safetensors.index.json", index(map).as_bytes());
        open_checkpoint(d)
    };
    let e = open_with(&[("a", "s1.safetensors"), ("b", "s2.safetensors")]).unwrap_err();
    assert!(
        matches!(&e, WeightError::IndexMismatch { reason, .. } if reason.contains("holds tensor `c`")),
        "{e}"
    );
    let e =
        open_with(&[("a", "s1.safetensors"), ("b", "s1.safetensors"), ("c", "s2.safetensors")]).unwrap_err();
    assert!(matches!(&e, WeightError::IndexMismatch { .. }), "{e}");
    let mut extra = good.to_vec();
    extra.push(("d", "s1.safetensors"));
    let e = open_with(&extra).unwrap_err();
    assert!(matches!(&e, WeightError::IndexMismatch { reason, .. } if reason.contains("`d`")), "{e}");
    let e = open_with(&[("a", "../s1.safetensors")]).unwrap_err();
    assert!(matches!(e, WeightError::BadIndex { .. }), "{e}");
    let e = open_with(&[("a", "gone.safetensors")]).unwrap_err();
    assert!(matches!(e, WeightError::Io { .. }), "{e}");
    write(d, "model.safetensors.index.json", b"{\"weight_map\": [1]}");
    assert!(matches!(open_checkpoint(d), Err(WeightError::BadIndex { .. })));
}

#[test]
fn open_finds_checkpoints_or_says_what_it_wanted() {
    let dir = TempDir::new("open");
    let e = open_checkpoint(dir.path()).unwrap_err();
    assert!(matches!(e, WeightError::NoCheckpoint { .. }));
    assert!(e.to_string().contains("model.safetensors.index.json"), "{e}");
    assert!(matches!(open_checkpoint(&dir.path().join("nope")), Err(WeightError::Io { .. })));
    let bin = write(dir.path(), "pytorch_model.bin", b"PK");
    assert!(matches!(open_checkpoint(&bin), Err(WeightError::NoCheckpoint { .. })));
}

/// Codes 0x38 (1.0) everywhere except three cells, in a 130 x 200 weight: 2 x 2 blocks of 128, the
/// last row and column of blocks partial.
fn fp8_example() -> (Vec<u8>, Vec<f32>) {
    let (rows, cols) = (130, 200);
    let mut codes = vec![0x38u8; rows * cols];
    codes[128] = 0x01; // (0, 128): 2^-9
    codes[129 * cols + 199] = 0xC4; // (129, 199): -(1 + 4/8) * 2^1 = -3
    codes[127 * cols + 127] = 0x7E; // (127, 127): 448
    (codes, vec![2.0, 3.0, 5.0, 7.0])
}

#[test]
fn fp8_weights_dequantise_by_block_including_partial_edges() {
    let (codes, scales) = fp8_example();
    let HostData::F32(w) = dequantize_blocks(&codes, 130, 200, &scales, [128, 128]) else { unreachable!() };
    let at = |i: usize, j: usize| w[i * 200 + j];
    // Each entry is fp8 * scale_inv of its block: [[2, 3], [5, 7]].
    assert_eq!([at(0, 0), at(0, 127), at(127, 0)], [2.0, 2.0, 2.0]);
    assert_eq!(at(127, 127), 448.0 * 2.0);
    assert_eq!(at(0, 128), 2f32.powi(-9) * 3.0);
    assert_eq!([at(0, 199), at(127, 128)], [3.0, 3.0]);
    assert_eq!([at(128, 0), at(129, 127)], [5.0, 5.0]);
    assert_eq!([at(128, 128), at(129, 198)], [7.0, 7.0]);
    assert_eq!(at(129, 199), -21.0);

    // The same through a file: the scale tensor is consumed by the read.
    let dir = TempDir::new("fp8");
    let header = r#"{"w.weight":{"dtype":"F8_E4M3","shape":[130,200],"data_offsets":[0,26000]},
        "w.weight_scale_inv":{"dtype":"F32","shape":[2,2],"data_offsets":[26000,26016]}}"#;
    let mut data = codes.clone();
    scales.iter().for_each(|s| data.extend(s.to_le_bytes()));
    write(dir.path(), "model.safetensors", &file(header, &data));
    let ck = open_checkpoint(dir.path()).unwrap();
    let t = ck.read("w.weight").unwrap();
    assert_eq!((t.dtype, t.shape.as_slice()), (DType::F32, &[130u64, 200][..]));
    assert_eq!(t.data, HostData::F32(w.clone()));
    let g = graph(&[("w.weight", DType::F32, &[130, 200])]);
    assert_eq!(bind(&g, &ck).unwrap()[0].data, HostData::F32(w));

    // With 64-row blocks the same scale tensor has the wrong shape, and says which it needs.
    let e = ck.clone().with_weight_block([64, 128]).unwrap().read("w.weight").unwrap_err();
    assert!(matches!(&e, WeightError::BadScale { reason, .. } if reason.contains("[3, 2]")), "{e}");
    assert!(matches!(ck.with_weight_block([0, 128]), Err(WeightError::BadBlock { .. })));
}

/// An FP8 graph (what `insert-fp8-casts` makes) binds DeepSeek's format as stored: the codes as
/// their E4M3 values, the scale as its own parameter; nothing is dequantised.
#[test]
fn fp8_parameters_bind_the_stored_codes_and_their_scales() {
    let (codes, scales) = fp8_example();
    let dir = TempDir::new("fp8raw");
    let header = r#"{"w.weight":{"dtype":"F8_E4M3","shape":[130,200],"data_offsets":[0,26000]},
        "w.weight_scale_inv":{"dtype":"F32","shape":[2,2],"data_offsets":[26000,26016]}}"#;
    let mut data = codes.clone();
    scales.iter().for_each(|s| data.extend(s.to_le_bytes()));
    write(dir.path(), "model.safetensors", &file(header, &data));
    let ck = open_checkpoint(dir.path()).unwrap();
    let g = graph(&[("w.weight", DType::F8E4M3, &[130, 200]), ("w.weight_scale_inv", DType::F32, &[2, 2])]);
    let b = bind(&g, &ck).unwrap();
    assert_eq!((b[0].dtype, b[1].dtype), (DType::F8E4M3, DType::F32));
    let HostData::F32(w) = &b[0].data else { panic!("float data") };
    let want: Vec<f32> = codes.iter().map(|&c| e4m3_to_f32(c)).collect();
    assert_eq!(w, &want);
    assert_eq!((w[128], w[129 * 200 + 199], w[127 * 200 + 127]), (2f32.powi(-9), -3.0, 448.0));
    assert_eq!(b[1].data, HostData::F32(scales.clone()));

    // Written back as declared, the pair is DeepSeek's format again, byte for byte in the data.
    let again = dir.path().join("again.safetensors");
    write_safetensors(&again, &b, StoreFloats::AsDeclared).unwrap();
    let ck2 = open_checkpoint(&again).unwrap();
    assert_eq!(ck2.get("w.weight").unwrap().dtype, StDType::F8E4M3);
    assert_eq!(ck2.raw("w.weight").unwrap(), codes);
    assert_eq!(bind(&g, &ck2).unwrap(), b);

    // Without its scale parameter the codes would be used unscaled.
    let lone = graph(&[("w.weight", DType::F8E4M3, &[130, 200])]);
    let e = bind(&lone, &ck).unwrap_err();
    assert!(matches!(&e, WeightError::UnscaledFp8 { scale, .. } if scale == "w.weight_scale_inv"), "{e}");
    // A high-precision checkpoint for an FP8 parameter is not quantised on the fly.
    let (_d, hp) = checkpoint_of(
        "fp8hp",
        &[f32s("w.weight", &[1], vec![1.0]), f32s("w.weight_scale_inv", &[1], vec![1.0])],
    );
    let g = graph(&[("w.weight", DType::F8E4M3, &[1]), ("w.weight_scale_inv", DType::F32, &[1])]);
    let e = bind(&g, &hp).unwrap_err();
    assert!(matches!(e, WeightError::UnsupportedParam { stored: StDType::F32, .. }), "{e}");
    assert!(e.to_string().contains("does not quantise weights while loading"), "{e}");
}

#[test]
fn fp8_needs_a_well_formed_scale() {
    let dir = TempDir::new("fp8bad");
    let open = |header: &str, data: &[u8]| {
        write(dir.path(), "model.safetensors", &file(header, data));
        open_checkpoint(dir.path()).unwrap()
    };
    let ck = open(r#"{"x.weight":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]}}"#, &[0x38; 4]);
    let e = ck.read("x.weight").unwrap_err();
    assert!(
        matches!(&e, WeightError::MissingScale { tensor, scale } if tensor == "x.weight" && scale == "x.weight_scale_inv")
    );
    assert!(e.to_string().contains("`x.weight`") && e.to_string().contains("`x.weight_scale_inv`"), "{e}");
    let g = graph(&[("x.weight", DType::BF16, &[2, 2])]);
    assert!(matches!(bind(&g, &ck), Err(WeightError::MissingScale { .. })));

    let ck = open(
        r#"{"x.weight":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},
            "x.weight_scale_inv":{"dtype":"I32","shape":[1,1],"data_offsets":[4,8]}}"#,
        &[0x38; 8],
    );
    assert!(matches!(ck.read("x.weight"), Err(WeightError::BadScale { .. })));
    let ck = open(r#"{"x":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#, &[0x38; 4]);
    assert!(matches!(ck.read("x"), Err(WeightError::Fp8Rank { .. })));
}

#[test]
fn every_malformed_header_has_its_error() {
    let t = |bytes: &[u8]| parse(bytes).unwrap_err();
    let one = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(parse(&file(one, &[0; 8])).is_ok());
    assert!(matches!(t(&[1, 0, 0]), WeightError::Truncated { len: 3, .. }));
    assert!(matches!(t(&file(one, &[0; 8])[..20]), WeightError::HeaderPastEof { .. }));
    // A header as long as the whole file: the 8 bytes of its length are not header.
    let whole = t(&[&24u64.to_le_bytes()[..], &[b' '; 16]].concat()).to_string();
    assert!(whole.ends_with("the header claims 24 bytes, but the file has only 16 after its 8-byte length (24 in all; truncated?)"), "{whole}");
    assert!(matches!(t(&u64::MAX.to_le_bytes()), WeightError::HeaderTooLarge { .. }));
    assert!(matches!(t(&file("{\"a\": ", &[])), WeightError::BadHeader { .. }));
    assert!(matches!(t(&file("[1, 2]", &[])), WeightError::BadHeader { .. }));
    assert!(matches!(t(&file(one, &[0; 4])), WeightError::OutOfRange { end: 8, data_len: 4, .. }));
    let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                     "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert!(
        matches!(t(&file(overlap, &[0; 8])), WeightError::Overlap { first, second, .. } if first == "a" && second == "b")
    );
    let length = r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#;
    assert!(matches!(t(&file(length, &[0; 8])), WeightError::ByteLength { expected: 6, found: 8, .. }));
    let dtype = r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}}"#;
    assert!(matches!(t(&file(dtype, &[0; 2])), WeightError::UnknownDType { dtype, .. } if dtype == "Q4"));
    let backwards = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}"#;
    assert!(matches!(t(&file(backwards, &[0; 2])), WeightError::BadHeader { .. }));
    let huge = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
    assert!(matches!(t(&file(huge, &[])), WeightError::BadHeader { .. }));
    let meta = r#"{"__metadata__":{"n":1}}"#;
    assert!(matches!(t(&file(meta, &[])), WeightError::BadHeader { .. }));
    let unknown_key = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}}"#;
    assert!(matches!(t(&file(unknown_key, &[0])), WeightError::BadHeader { .. }));
    // Zero-sized tensors at the same offset do not overlap anything.
    let zeros = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},
                   "b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert_eq!(parse(&file(zeros, &[0; 8])).unwrap().len(), 2);
    // Messages name the file and the tensor.
    let msg = t(&file(length, &[0; 8])).to_string();
    assert!(msg.starts_with("t.safetensors: tensor `a` (BF16[3])"), "{msg}");
}

#[test]
fn types_kiln_does_not_use_are_refused_on_read() {
    let dir = TempDir::new("f64");
    let header = r#"{"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},
                     "u":{"dtype":"U64","shape":[1],"data_offsets":[8,16]},
                     "s":{"dtype":"I16","shape":[2],"data_offsets":[16,20]}}"#;
    let mut data = 1.0f64.to_le_bytes().to_vec();
    data.extend(u64::MAX.to_le_bytes());
    data.extend([0xFF, 0xFF, 0x02, 0x00]);
    write(dir.path(), "model.safetensors", &file(header, &data));
    let ck = open_checkpoint(dir.path()).unwrap();
    assert!(matches!(ck.read("d"), Err(WeightError::UnsupportedDType { dtype: StDType::F64, .. })));
    assert!(matches!(ck.read("u"), Err(WeightError::UnsupportedDType { dtype: StDType::U64, .. })));
    let s = ck.read("s").unwrap();
    assert_eq!((s.dtype, s.data), (DType::I32, HostData::I64(vec![-1, 2])));
}

#[test]
fn writing_refuses_what_it_cannot_store() {
    let dir = TempDir::new("write");
    let p = dir.path().join("model.safetensors");
    let bad = |t: HostTensor, floats| write_safetensors(&p, &[t], floats).unwrap_err();
    assert!(matches!(bad(f32s("a", &[3], vec![1.0]), StoreFloats::F32), WeightError::BadTensor { .. }));
    assert!(matches!(
        bad(f32s("__metadata__", &[1], vec![1.0]), StoreFloats::F32),
        WeightError::BadTensor { .. }
    ));
    let fp8 = HostTensor { dtype: DType::F8E4M3, ..f32s("q", &[1], vec![1.0]) };
    assert!(matches!(bad(fp8.clone(), StoreFloats::AsDeclared), WeightError::BadTensor { .. }));
    write_safetensors(&p, &[fp8], StoreFloats::BF16).unwrap();
    let big = HostTensor {
        name: "i".into(),
        dtype: DType::I32,
        shape: vec![1],
        data: HostData::I64(vec![1 << 40]),
    };
    assert!(matches!(bad(big, StoreFloats::F32), WeightError::BadTensor { .. }));
    let two =
        HostTensor { name: "b".into(), dtype: DType::Bool, shape: vec![1], data: HostData::I64(vec![2]) };
    assert!(matches!(bad(two, StoreFloats::F32), WeightError::BadTensor { .. }));
    let dup = [f32s("a", &[1], vec![1.0]), f32s("a", &[1], vec![2.0])];
    assert!(matches!(write_safetensors(&p, &dup, StoreFloats::F32), Err(WeightError::BadTensor { .. })));
    let nowhere = dir.path().join("missing-dir").join("x.safetensors");
    assert!(matches!(write_safetensors(&nowhere, &dup[..1], StoreFloats::F32), Err(WeightError::Io { .. })));
    // Failed writes leave only the earlier, complete file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Writes `tensors` as the single-file checkpoint of a fresh directory and opens it.
fn checkpoint_of(tag: &str, tensors: &[HostTensor]) -> (TempDir, Checkpoint) {
    let dir = TempDir::new(tag);
    write_safetensors(&dir.path().join("model.safetensors"), tensors, StoreFloats::AsDeclared).unwrap();
    let ck = open_checkpoint(dir.path()).unwrap();
    (dir, ck)
}

#[test]
fn bind_reports_missing_misshapen_mistyped_and_extra_tensors() {
    let stored: Vec<HostTensor> = (0..3).map(|i| f32s(&format!("p{i}"), &[2], vec![i as f32; 2])).collect();
    let (_d, ck) = checkpoint_of("bind", &stored);

    let many: Vec<(String, DType, Vec<u64>)> =
        (0..15).map(|i| (format!("q{i:02}"), DType::F32, vec![2])).collect();
    let mut specs: Vec<(&str, DType, &[u64])> =
        many.iter().map(|(n, d, s)| (n.as_str(), *d, &s[..])).collect();
    specs.push(("p0", DType::F32, &[2]));
    let e = bind(&graph(&specs), &ck).unwrap_err();
    assert!(
        matches!(&e, WeightError::Missing { count: 15, names } if names.len() == 10 && names[0] == "q00")
    );
    assert!(e.to_string().ends_with("`q09` and 5 more"), "{e}");

    let all = |p2: (&'static str, DType, &'static [u64])| {
        graph(&[("p0", DType::F32, &[2]), ("p1", DType::F32, &[2]), p2])
    };
    let e = bind(&all(("p2", DType::F32, &[1, 2])), &ck).unwrap_err();
    assert!(
        matches!(&e, WeightError::ShapeMismatch { name, expected, found } if name == "p2" && expected == &[1, 2] && found == &[2])
    );
    assert_eq!(e.to_string(), "tensor `p2`: the graph expects shape [1, 2] but the checkpoint has [2]");
    let e = bind(&all(("p2", DType::I32, &[2])), &ck).unwrap_err();
    assert!(matches!(e, WeightError::DTypeClass { param: DType::I32, stored: StDType::F32, .. }));
    let e = bind(&graph(&[("p0", DType::F32, &[2]), ("p2", DType::F32, &[2])]), &ck).unwrap_err();
    assert!(matches!(&e, WeightError::Extra { count: 1, names } if names == &["p1"]), "{e}");

    let bound = bind(&all(("p2", DType::BF16, &[2])), &ck).unwrap();
    assert_eq!(bound.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["p0", "p1", "p2"]);
    assert_eq!((bound[2].dtype, &bound[2].data), (DType::BF16, &HostData::F32(vec![2.0; 2])));
}

#[test]
fn bind_converts_floats_by_rounding_and_checks_integers() {
    let x = 1.0 + 2f32.powi(-10);
    let ints = HostTensor {
        name: "n".into(),
        dtype: DType::I64,
        shape: vec![2],
        data: HostData::I64(vec![3, 1 << 33]),
    };
    let (_d, ck) = checkpoint_of("conv", &[f32s("w", &[1], vec![x]), ints]);
    let b = bind(&graph(&[("w", DType::BF16, &[1]), ("n", DType::I64, &[2])]), &ck).unwrap();
    assert_eq!(b[0].data, HostData::F32(vec![1.0]));
    let b = bind(&graph(&[("w", DType::F16, &[1]), ("n", DType::I64, &[2])]), &ck).unwrap();
    assert_eq!(b[0].data, HostData::F32(vec![x]));
    let e = bind(&graph(&[("w", DType::F32, &[1]), ("n", DType::I32, &[2])]), &ck).unwrap_err();
    assert!(matches!(e, WeightError::IntOutOfRange { value: 8_589_934_592, .. }));
    let e = bind(&graph(&[("w", DType::F8E4M3, &[1]), ("n", DType::I64, &[2])]), &ck).unwrap_err();
    assert!(matches!(e, WeightError::UnsupportedParam { .. }));
}

#[test]
fn bind_skips_buffers_scales_and_mtp_copies_only() {
    let t = |n: &str, shape: &[u64]| f32s(n, shape, vec![0.5; shape.iter().product::<u64>() as usize]);
    let params: [(&str, DType, &[u64]); 3] = [
        ("model.embed_tokens.weight", DType::F32, &[4, 2]),
        ("lm_head.weight", DType::F32, &[4, 2]),
        ("model.layers.1.eh_proj.weight", DType::F32, &[2, 4]),
    ];
    let mut stored: Vec<HostTensor> = params.iter().map(|(n, _, s)| t(n, s)).collect();
    stored.push(t("model.layers.1.embed_tokens.weight", &[4, 2]));
    stored.push(t("model.layers.1.shared_head.head.weight", &[4, 2]));
    stored.push(t("model.layers.0.self_attn.rotary_emb.inv_freq", &[1]));
    let (_d, ck) = checkpoint_of("skip", &stored);
    assert_eq!(bind(&graph(&params), &ck).unwrap().len(), 3);

    // Layer 0 is not an MTP layer of this graph: its copy is unexplained.
    stored.push(t("model.layers.0.embed_tokens.weight", &[4, 2]));
    let (_d, ck) = checkpoint_of("skip2", &stored);
    let e = bind(&graph(&params), &ck).unwrap_err();
    assert!(
        matches!(&e, WeightError::Extra { names, .. } if names == &["model.layers.0.embed_tokens.weight"])
    );

    stored.pop();
    stored[4] = t("model.layers.1.shared_head.head.weight", &[2, 4]);
    let (_d, ck) = checkpoint_of("skip3", &stored);
    let e = bind(&graph(&params), &ck).unwrap_err();
    assert!(matches!(&e, WeightError::CopyMismatch { shared, .. } if shared == "lm_head.weight"), "{e}");

    // A scale is consumed only by an FP8 tensor; next to a float tensor it is extra.
    let (_d, ck) = checkpoint_of("skip4", &[t("a", &[1]), t("a_scale_inv", &[1])]);
    assert!(matches!(bind(&graph(&[("a", DType::F32, &[1])]), &ck), Err(WeightError::Extra { .. })));
}

#[test]
fn params_must_have_constant_shapes_and_one_type() {
    let (_d, ck) = checkpoint_of("sym", &[f32s("a", &[1], vec![1.0])]);
    let mut g = Graph::new("g");
    let ty = TensorType::new(DType::F32, [Dim::T]);
    g.add_node(Op::Param { name: "a".into() }, &[], vec![ty], None).unwrap();
    assert!(matches!(bind(&g, &ck), Err(WeightError::SymbolicParam { .. })));
    assert!(matches!(random_params(&g, 0, 1.0), Err(WeightError::SymbolicParam { .. })));
    let g = graph(&[("a", DType::F32, &[1 << 32, 1 << 32])]);
    assert!(matches!(random_params(&g, 0, 1.0), Err(WeightError::ParamTooLarge { .. })));
    let g = graph(&[("a", DType::F32, &[1]), ("a", DType::BF16, &[1])]);
    assert!(matches!(bind(&g, &ck), Err(WeightError::ConflictingParam { .. })));
    let g = graph(&[("a", DType::F32, &[1]), ("a", DType::F32, &[1])]);
    assert_eq!(bind(&g, &ck).unwrap().len(), 1);
}

#[test]
fn random_params_follow_their_rules() {
    let g = graph(&[
        ("model.norm.weight", DType::F32, &[3]),
        ("model.layers.0.input_layernorm.weight", DType::BF16, &[2]),
        ("w", DType::BF16, &[64, 64]),
        ("model.layers.1.mlp.gate.e_score_correction_bias", DType::F32, &[16]),
        ("ids", DType::I32, &[2]),
    ]);
    let r = random_params(&g, 7, 0.02).unwrap();
    assert_eq!(r[0].data, HostData::F32(vec![1.0; 3]));
    assert_eq!(r[1].data, HostData::F32(vec![1.0; 2]));
    let HostData::F32(w) = &r[2].data else { panic!("float param") };
    assert!(w.iter().all(|&x| bf16_to_f32(f32_to_bf16(x)) == x), "bf16 params hold bf16 values");
    let std = (w.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.001, "{std}");
    let HostData::F32(bias) = &r[3].data else { panic!("float param") };
    assert!(bias.iter().all(|&b| b != 0.0 && b.abs() < 0.2));
    assert_eq!(r[4].data, HostData::I64(vec![0, 0]));
    assert_eq!(random_params(&g, 7, 0.02).unwrap(), r);
    assert_ne!(random_params(&g, 8, 0.02).unwrap()[2], r[2]);
}

fn valid_file() -> Vec<u8> {
    let header = r#"{"__metadata__":{"format":"pt"},
        "a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},
        "b":{"dtype":"F8_E4M3","shape":[3],"data_offsets":[8,11]},
        "c":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#;
    file(header, &(0u8..24).collect::<Vec<_>>())
}

/// Parsing, then decoding every tensor the header admits, must never panic.
fn parse_and_decode(bytes: &[u8]) {
    if let Ok(entries) = parse(bytes) {
        for e in entries {
            let data = &bytes[e.begin as usize..e.end as usize];
            let _ = super::safetensors::decode(&e.name, e.dtype, data);
        }
    }
}

#[test]
fn every_truncation_of_a_file_is_an_error() {
    let bytes = valid_file();
    assert_eq!(parse(&bytes).unwrap().len(), 3);
    let dir = TempDir::new("trunc");
    for cut in 0..bytes.len() {
        let e = parse(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(
                e,
                WeightError::Truncated { .. }
                    | WeightError::HeaderPastEof { .. }
                    | WeightError::OutOfRange { .. }
            ),
            "cut at {cut}: {e}"
        );
        // The same through the file system: the header is checked against the mapping's length
        // before any tensor byte is touched, so a short file is the same error, never a fault.
        let p = write(dir.path(), "x.safetensors", &bytes[..cut]);
        let e = open_checkpoint(&p).unwrap_err();
        assert!(
            matches!(
                e,
                WeightError::Truncated { .. }
                    | WeightError::HeaderPastEof { .. }
                    | WeightError::OutOfRange { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
}

/// Where a bound parameter's bytes are: `Some(offset in its file)` when mapped.
fn mapped_offset(p: &Param, ck: &Checkpoint) -> Option<usize> {
    let Param::Mapped(v) = p else { return None };
    let file = ck.mappings().iter().find(|m| m.address_range().contains(&(v.as_ptr() as usize)))?;
    assert!(v.as_ptr() as usize + v.len() <= file.address_range().end, "{} ends inside its file", v.name);
    Some(v.as_ptr() as usize - file.address_range().start)
}

#[test]
fn bind_mapped_borrows_what_needs_no_conversion_and_converts_the_rest() {
    let ints = HostTensor {
        name: "n".into(),
        dtype: DType::I32,
        shape: vec![3],
        data: HostData::I64(vec![-1, 0, 7]),
    };
    let flags =
        HostTensor { name: "b".into(), dtype: DType::Bool, shape: vec![2], data: HostData::I64(vec![1, 0]) };
    let half = HostTensor {
        name: "h".into(),
        dtype: DType::BF16,
        shape: vec![2],
        data: HostData::F32(vec![1.5, -2.0]),
    };
    let stored =
        [f32s("w", &[2, 2], vec![1.0, -2.0, 0.25, 8.0]), ints, flags, half, f32s("v", &[1], vec![3.0])];
    let (_d, ck) = checkpoint_of("mapped", &stored);
    // `v` is stored as f32 but declared bf16: converted. `h` is bf16 as declared: mapped.
    let params = graph_params(&graph(&[
        ("w", DType::F32, &[2, 2]),
        ("n", DType::I32, &[3]),
        ("b", DType::Bool, &[2]),
        ("h", DType::BF16, &[2]),
        ("v", DType::BF16, &[1]),
    ]))
    .unwrap();
    let copied: Vec<HostTensor> =
        bind_params(params.clone(), &ck).unwrap().collect::<Result<_, _>>().unwrap();
    let mapped: Vec<Param> = bind_mapped(params, &ck).unwrap().collect::<Result<_, _>>().unwrap();
    let kinds: Vec<bool> = mapped.iter().map(|p| mapped_offset(p, &ck).is_some()).collect();
    // Bools are converted even when stored as bools: their bytes may be other than 0 and 1.
    assert_eq!(kinds, [true, true, false, true, false]);
    for (m, c) in mapped.iter().zip(&copied) {
        match m {
            Param::Mapped(v) => {
                assert_eq!((&v.name, v.dtype, &v.shape), (&c.name, c.dtype, &c.shape));
                // The mapped bytes are exactly what converting the copied values produces.
                let mut want = vec![0u8; c.data.len() * c.dtype.size_bytes() as usize];
                crate::host::encode(c.dtype, &c.data, &mut want).unwrap();
                assert_eq!(v.bytes(), &want[..], "{}", v.name);
            }
            Param::Host(t) => assert_eq!(t, c),
        }
    }
}

#[test]
fn misaligned_and_fp8_tensors_bind_mapped_as_the_layout_allows() {
    // A header of odd length puts the data section at an odd address: f32 `x` cannot be borrowed
    // (it would be misaligned for its element type) and is converted; one-byte FP8 codes can.
    let header = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"#.to_string()
        + r#""q":{"dtype":"F8_E4M3","shape":[1,2],"data_offsets":[8,10]},"#
        + r#""q_scale_inv":{"dtype":"F32","shape":[1,1],"data_offsets":[12,16]}}"#;
    let header = if header.len() % 2 == 0 { header + " " } else { header };
    let mut data = Vec::new();
    data.extend(1.5f32.to_le_bytes());
    data.extend((-4.0f32).to_le_bytes());
    data.extend([0x38, 0xC0, 0, 0]); // E4M3 codes of 1.0 and -2.0, then padding
    data.extend(0.5f32.to_le_bytes());
    let dir = TempDir::new("misaligned");
    write(dir.path(), "model.safetensors", &file(&header, &data));
    let ck = open_checkpoint(dir.path()).unwrap();
    let g = graph(&[
        ("x", DType::F32, &[2]),
        ("q", DType::F8E4M3, &[1, 2]),
        ("q_scale_inv", DType::F32, &[1, 1]),
    ]);
    let mapped: Vec<Param> =
        bind_mapped(graph_params(&g).unwrap(), &ck).unwrap().collect::<Result<_, _>>().unwrap();
    let offsets: Vec<Option<usize>> = mapped.iter().map(|p| mapped_offset(p, &ck)).collect();
    let start = 8 + header.len();
    assert_eq!(offsets, [None, Some(start + 8), None]);
    let Param::Host(x) = &mapped[0] else { unreachable!() };
    assert_eq!(x.data, HostData::F32(vec![1.5, -4.0]));
    let Param::Mapped(q) = &mapped[1] else { unreachable!() };
    assert_eq!((q.dtype, q.bytes()), (DType::F8E4M3, &[0x38u8, 0xC0][..]));
    assert_eq!(bind(&g, &ck).unwrap()[1].data, HostData::F32(vec![1.0, -2.0]));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        parse_and_decode(&bytes);
    }

    #[test]
    fn random_headers_never_panic(json in "\\{[\"a-z0-9_:,\\[\\]{} ]{0,120}\\}", data in proptest::collection::vec(any::<u8>(), 0..32)) {
        parse_and_decode(&file(&json, &data));
    }

    #[test]
    fn mutated_files_never_panic(cut in 0usize..200, flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..4)) {
        let mut bytes = valid_file();
        for (at, v) in flips {
            let n = bytes.len();
            bytes[at % n] = v;
        }
        bytes.truncate(cut.min(bytes.len()));
        parse_and_decode(&bytes);
    }
}
