//! Tests of token files: both formats on small files written here (safetensors byte by byte, so
//! every dtype and every malformed case is exactly the one named), the stream's row cutting, every
//! error with its message, and corrupted files that must be errors rather than panics.

use std::path::{Path, PathBuf};

use kiln_ir::DType;
use proptest::prelude::*;

use super::*;
use crate::weights::tests::TempDir;
use crate::weights::{write_safetensors, HostTensor, StoreFloats};

/// A safetensors file from a literal header and data section.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A safetensors file holding one tensor `name` of `dtype` and `shape` with these data bytes.
fn st_one(name: &str, dtype: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let header =
        format!(r#"{{"{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[0,{}]}}}}"#, data.len());
    st_bytes(&header, data)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn u16_stream(tokens: impl IntoIterator<Item = u16>) -> Vec<u8> {
    tokens.into_iter().flat_map(u16::to_le_bytes).collect()
}

fn u32_stream(tokens: impl IntoIterator<Item = u32>) -> Vec<u8> {
    tokens.into_iter().flat_map(u32::to_le_bytes).collect()
}

fn stream(dtype: StreamDType, seq_len: u64) -> TokenFormat {
    TokenFormat::Stream { dtype, seq_len }
}

fn rows_of(t: &TokenRows) -> Vec<Vec<i64>> {
    (0..t.rows()).map(|i| t.row(i).to_vec()).collect()
}

fn err(r: Result<TokenRows, DataError>) -> DataError {
    r.expect_err("expected an error")
}

// Safetensors.

#[test]
fn safetensors_i64_rows_load() {
    let dir = TempDir::new("data-st");
    let p = dir.path().join("tokens.safetensors");
    let tokens = HostTensor {
        name: "tokens".into(),
        dtype: DType::I64,
        shape: vec![3, 4],
        data: HostData::I64(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 511]),
    };
    let other = HostTensor {
        name: "lengths".into(),
        dtype: DType::I32,
        shape: vec![3],
        data: HostData::I64(vec![4, 4, 4]),
    };
    write_safetensors(&p, &[other, tokens], StoreFloats::AsDeclared).unwrap();
    let rows = load_tokens(&p, &TokenFormat::Safetensors).unwrap();
    assert_eq!((rows.rows(), rows.width(), rows.dropped(), rows.targets()), (3, 4, 0, 9));
    assert_eq!(rows_of(&rows), vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10, 11, 511]]);
    assert_eq!(rows.source(), Some(p.as_path()));
    assert_eq!(rows.iter().count(), 3);
    rows.check(512, 3, "the test").unwrap();
}

#[test]
fn safetensors_every_integer_dtype_loads() {
    let dir = TempDir::new("data-st-dtypes");
    let cases: Vec<(&str, Vec<u8>, Vec<i64>)> = vec![
        ("I32", [7i32, -1, 70_000, 3].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![7, -1, 70_000, 3]),
        (
            "U32",
            [4_000_000_000u32, 0, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            vec![4_000_000_000, 0, 1, 2],
        ),
        ("I16", [-2i16, 300, 5, 6].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![-2, 300, 5, 6]),
        ("U16", u16_stream([65_535, 1, 2, 3]), vec![65_535, 1, 2, 3]),
        ("U8", vec![255, 0, 9, 8], vec![255, 0, 9, 8]),
        ("I64", [i64::MAX, 1, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![i64::MAX, 1, 2, 3]),
    ];
    for (dtype, data, want) in cases {
        let p = write(dir.path(), &format!("{dtype}.safetensors"), &st_one("tokens", dtype, &[2, 2], &data));
        let rows = load_tokens(&p, &TokenFormat::Safetensors).unwrap();
        assert_eq!(rows_of(&rows), vec![want[..2].to_vec(), want[2..].to_vec()], "{dtype}");
    }
}

#[test]
fn safetensors_float_tokens_are_the_wrong_dtype() {
    let dir = TempDir::new("data-st-float");
    for dtype in ["F32", "BF16", "F16", "F64"] {
        let size = if dtype == "F32" {
            4
        } else if dtype == "F64" {
            8
        } else {
            2
        };
        let p = write(dir.path(), "t.safetensors", &st_one("tokens", dtype, &[1, 2], &vec![0; 2 * size]));
        let e = err(load_tokens(&p, &TokenFormat::Safetensors));
        assert!(matches!(e, DataError::WrongDType { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: tensor `tokens` is {dtype}; token ids must be one of I64, I32, U32, I16, U16 or U8",
                p.display()
            )
        );
    }
    // Integer types that are not token types are refused the same way.
    for (dtype, size) in [("BOOL", 1), ("I8", 1), ("U64", 8)] {
        let p = write(dir.path(), "t.safetensors", &st_one("tokens", dtype, &[1, 2], &vec![0; 2 * size]));
        assert!(matches!(err(load_tokens(&p, &TokenFormat::Safetensors)), DataError::WrongDType { .. }));
    }
}

#[test]
fn safetensors_without_tokens_lists_what_is_there() {
    let dir = TempDir::new("data-st-missing");
    let header = r#"{"input_ids":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]},"labels":{"dtype":"I64","shape":[1,2],"data_offsets":[16,32]}}"#;
    let p = write(dir.path(), "t.safetensors", &st_bytes(header, &[0; 32]));
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: no tensor `tokens`; the file has `input_ids`, `labels`; a token file holds an integer \
             tensor `tokens` of shape [N, T+1]",
            p.display()
        )
    );
    let p = write(dir.path(), "e.safetensors", &st_bytes(r#"{"__metadata__":{"format":"pt"}}"#, &[]));
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert!(e.to_string().contains("no tensor `tokens`; the file has no tensors;"), "{e}");
}

#[test]
fn safetensors_bad_shapes_are_errors_with_the_shape() {
    let dir = TempDir::new("data-st-shape");
    for shape in [vec![4u64], vec![2, 2, 1], vec![4, 1], vec![0, 4], vec![]] {
        let numel: u64 = shape.iter().product();
        let p = write(
            dir.path(),
            "t.safetensors",
            &st_one("tokens", "I64", &shape, &vec![0; numel as usize * 8]),
        );
        let e = err(load_tokens(&p, &TokenFormat::Safetensors));
        assert!(matches!(e, DataError::BadShape { .. }), "{shape:?}: {e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: tensor `tokens` has shape {shape:?}; expected [N, T+1] with N >= 1 rows of T+1 >= 2 \
                 tokens (inputs are [:, :-1], targets [:, 1:])",
                p.display()
            )
        );
    }
}

#[test]
fn safetensors_header_errors_come_from_the_checkpoint_validation() {
    let dir = TempDir::new("data-st-header");
    // A hostile header length: refused before anything is allocated.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let p = write(dir.path(), "huge.safetensors", &bytes);
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert!(matches!(e, DataError::Safetensors(WeightError::HeaderTooLarge { .. })), "{e:?}");
    assert!(e.to_string().starts_with(&format!("{}: the header claims", p.display())), "{e}");
    // Data past the end of the file.
    let good = st_one("tokens", "I64", &[1, 2], &[0; 16]);
    let p = write(dir.path(), "short.safetensors", &good[..good.len() - 1]);
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert!(matches!(e, DataError::Safetensors(WeightError::OutOfRange { .. })), "{e:?}");
    // Fewer than 8 bytes.
    let p = write(dir.path(), "tiny.safetensors", &[1, 2, 3]);
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert!(matches!(e, DataError::Safetensors(WeightError::Truncated { .. })), "{e:?}");
}

/// Every prefix of a valid token file, and the file with each byte replaced by a few values, loads
/// or fails with an error: never a panic, never an unbounded allocation.
#[test]
fn corrupt_safetensors_never_panics() {
    let dir = TempDir::new("data-st-corrupt");
    let tokens: Vec<u8> = (0..12i64).flat_map(|v| v.to_le_bytes()).collect();
    let good = st_one("tokens", "I64", &[3, 4], &tokens);
    let p = dir.path().join("t.safetensors");
    for cut in 0..good.len() {
        std::fs::write(&p, &good[..cut]).unwrap();
        assert!(load_tokens(&p, &TokenFormat::Safetensors).is_err(), "a file cut at {cut} loaded");
    }
    for i in 0..good.len() {
        for v in [0u8, 0xff, good[i] ^ 1, b'9', b'"', b'}'] {
            let mut bad = good.clone();
            bad[i] = v;
            std::fs::write(&p, &bad).unwrap();
            if let Ok(rows) = load_tokens(&p, &TokenFormat::Safetensors) {
                assert!(rows.width() >= 2 && rows.rows() >= 1 && rows.tokens().len() <= bad.len());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Random overwrites anywhere in a valid token file: never a panic.
    #[test]
    fn random_corruption_never_panics(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let dir = TempDir::new("data-st-prop");
        let tokens: Vec<u8> = (0..6i32).flat_map(|v| v.to_le_bytes()).collect();
        let mut bytes = st_one("tokens", "I32", &[2, 3], &tokens);
        for (i, v) in edits {
            let n = bytes.len();
            bytes[i % n] = v;
        }
        let p = write(dir.path(), "t.safetensors", &bytes);
        let _ = load_tokens(&p, &TokenFormat::Safetensors);
        let _ = load_tokens(&p, &stream(StreamDType::U16, 3));
    }
}

// Streams.

#[test]
fn u16_stream_rows_overlap_by_one_token() {
    let dir = TempDir::new("data-stream16");
    // 11 tokens, seq_len 3: rows start at 0, 3, 6 and hold 4 tokens; token 10 fills no row.
    let p = write(dir.path(), "t.bin", &u16_stream(100..111));
    let rows = load_tokens(&p, &stream(StreamDType::U16, 3)).unwrap();
    assert_eq!(
        rows_of(&rows),
        vec![vec![100, 101, 102, 103], vec![103, 104, 105, 106], vec![106, 107, 108, 109]]
    );
    assert_eq!((rows.width(), rows.dropped(), rows.targets()), (4, 1, 9));
    // The nanoGPT/llm.c window: a stream of exactly seq_len + 1 tokens is one row.
    let p = write(dir.path(), "one.bin", &u16_stream([1, 2, 3, 65_535]));
    let rows = load_tokens(&p, &stream(StreamDType::U16, 3)).unwrap();
    assert_eq!((rows_of(&rows), rows.dropped()), (vec![vec![1, 2, 3, 65_535]], 0));
}

#[test]
fn u32_stream_loads_ids_past_u16() {
    let dir = TempDir::new("data-stream32");
    let p = write(dir.path(), "t.bin", &u32_stream([70_000, 1, 4_294_967_295, 2, 3]));
    let rows = load_tokens(&p, &stream(StreamDType::U32, 2)).unwrap();
    assert_eq!(rows_of(&rows), vec![vec![70_000, 1, 4_294_967_295], vec![4_294_967_295, 2, 3]]);
    assert_eq!(rows.dropped(), 0);
}

/// Over many lengths: every token after the first is a target exactly once, in order, and the
/// dropped tail is shorter than a row's step.
#[test]
fn stream_targets_cover_the_stream_once() {
    let dir = TempDir::new("data-stream-cover");
    for n in 2u16..40 {
        let p = write(dir.path(), "t.bin", &u16_stream(0..n));
        for seq_len in 1..n as u64 {
            let rows = load_tokens(&p, &stream(StreamDType::U16, seq_len)).unwrap();
            let targets: Vec<i64> = rows.iter().flat_map(|r| r[1..].to_vec()).collect();
            let used = targets.len() as u64 + 1;
            assert_eq!(targets, (1..used as i64).collect::<Vec<_>>(), "n {n}, seq_len {seq_len}");
            assert_eq!(rows.dropped(), n as u64 - used, "n {n}, seq_len {seq_len}");
            assert!(rows.dropped() < seq_len, "n {n}, seq_len {seq_len}");
            for r in rows.iter() {
                assert_eq!(r.len() as u64, seq_len + 1);
            }
        }
    }
}

#[test]
fn stream_length_must_be_whole_tokens() {
    let dir = TempDir::new("data-stream-len");
    let p = write(dir.path(), "t.bin", &[0; 7]);
    let e = err(load_tokens(&p, &stream(StreamDType::U16, 2)));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: 7 bytes is not a whole number of u16 tokens (2 bytes each); is --dtype right?",
            p.display()
        )
    );
    let p = write(dir.path(), "t.bin", &[0; 10]);
    let e = err(load_tokens(&p, &stream(StreamDType::U32, 1)));
    assert!(matches!(e, DataError::StreamLength { bytes: 10, dtype: StreamDType::U32, .. }), "{e:?}");
    assert!(e.to_string().contains("10 bytes is not a whole number of u32 tokens (4 bytes each)"), "{e}");
}

#[test]
fn stream_shorter_than_a_row() {
    let dir = TempDir::new("data-stream-short");
    let p = write(dir.path(), "t.bin", &u16_stream(0..16));
    let e = err(load_tokens(&p, &stream(StreamDType::U16, 16)));
    assert_eq!(
        e.to_string(),
        format!("{}: the stream has 16 u16 token(s) but one row of --seq-len 16 needs 17", p.display())
    );
    // A seq_len whose row length overflows is still just too long.
    let e = err(load_tokens(&p, &stream(StreamDType::U16, u64::MAX)));
    assert!(
        e.to_string().contains("one row of --seq-len 18446744073709551615 needs 18446744073709551616"),
        "{e}"
    );
}

#[test]
fn zero_seq_len_is_refused() {
    let dir = TempDir::new("data-stream-zero");
    let p = write(dir.path(), "t.bin", &u16_stream(0..4));
    let e = err(load_tokens(&p, &stream(StreamDType::U16, 0)));
    assert_eq!(
        e.to_string(),
        format!("{}: --seq-len is 0; a row needs at least one target, so it must be at least 1", p.display())
    );
    assert!(matches!(format_for(&p, Some(StreamDType::U16), Some(0)), Err(DataError::ZeroSeqLen { .. })));
}

// Files that cannot be read at all.

#[test]
fn io_errors_name_the_path() {
    let dir = TempDir::new("data-io");
    let p = dir.path().join("absent.safetensors");
    let e = err(load_tokens(&p, &TokenFormat::Safetensors));
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&format!("{}: ", p.display())), "{e}");
    let e = err(load_tokens(dir.path(), &stream(StreamDType::U16, 4)));
    assert_eq!(e.to_string(), format!("{}: is a directory, not a token file", dir.path().display()));
}

#[test]
fn empty_files_are_refused() {
    let dir = TempDir::new("data-empty");
    for (name, format) in
        [("t.safetensors", TokenFormat::Safetensors), ("t.bin", stream(StreamDType::U32, 8))]
    {
        let p = write(dir.path(), name, &[]);
        let e = err(load_tokens(&p, &format));
        assert_eq!(
            e.to_string(),
            format!("{}: the file is empty; a token file holds at least one row of two tokens", p.display())
        );
    }
}

// Choosing the format.

#[test]
fn format_follows_the_extension() {
    let st = Path::new("data/val.safetensors");
    assert_eq!(format_for(st, None, None).unwrap(), TokenFormat::Safetensors);
    assert_eq!(format_for(Path::new("X.SafeTensors"), None, None).unwrap(), TokenFormat::Safetensors);
    let bin = Path::new("data/val.bin");
    assert_eq!(format_for(bin, Some(StreamDType::U32), Some(1024)).unwrap(), stream(StreamDType::U32, 1024));

    let e = format_for(bin, None, Some(16)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data/val.bin: a .bin token stream needs --dtype u16|u32: the file holds only the ids, not their \
         type or the row length"
    );
    let e = format_for(bin, Some(StreamDType::U16), None).unwrap_err();
    assert!(e.to_string().contains("needs --seq-len N:"), "{e}");
    let e = format_for(bin, None, None).unwrap_err();
    assert!(e.to_string().contains("needs --dtype u16|u32 and --seq-len N:"), "{e}");

    let e = format_for(Path::new("data/val.npy"), None, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data/val.npy: unknown token file format: expected a .safetensors file (an integer tensor `tokens` \
         of shape [N, T+1]) or a .bin stream of little-endian token ids (with --dtype u16|u32 and --seq-len N)"
    );
    assert!(matches!(format_for(Path::new("tokens"), None, None), Err(DataError::UnknownFormat { .. })));

    let e = format_for(st, None, Some(16)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data/val.safetensors: --seq-len N applies only to .bin token streams; a .safetensors file's \
         `tokens` tensor has its own rows"
    );
    assert!(matches!(
        format_for(st, Some(StreamDType::U16), None),
        Err(DataError::UnusedFlag { flag: "--dtype u16|u32", .. })
    ));
}

#[test]
fn stream_dtype_names_round_trip() {
    for d in [StreamDType::U16, StreamDType::U32] {
        assert_eq!(StreamDType::parse(d.name()), Some(d));
        assert_eq!(d.to_string(), d.name());
    }
    assert_eq!(StreamDType::parse("u8"), None);
    assert_eq!(StreamDType::parse("U16"), None);
    assert_eq!((StreamDType::U16.size_bytes(), StreamDType::U32.size_bytes()), (2, 4));
}

// Checking rows against a model.

#[test]
fn check_names_the_first_id_outside_the_vocabulary() {
    let mut tokens = vec![1i64; 4 * 18];
    tokens[3 * 18 + 17] = 600;
    tokens[3 * 18 + 17 - 1] = 0;
    let rows = TokenRows::from_rows(18, tokens).unwrap();
    let e = rows.check(512, 17, "the artifact").unwrap_err();
    assert_eq!(e.to_string(), "row 3, position 17: token 600 is outside the vocabulary 0..512");
    rows.check(601, 17, "the artifact").unwrap();

    let rows = TokenRows::from_rows(2, vec![0, 5, -1, 9]).unwrap();
    let e = rows.check(4, 1, "x").unwrap_err();
    assert!(matches!(e, DataError::OutOfVocab { row: 0, position: 1, token: 5, vocab: 4, .. }), "{e:?}");
    let e = rows.check(10, 1, "x").unwrap_err();
    assert_eq!(e.to_string(), "row 1, position 0: token -1 is outside the vocabulary 0..10");

    // Rows read from a file name it.
    let dir = TempDir::new("data-check");
    let p = write(dir.path(), "t.bin", &u16_stream([1, 2, 3, 600, 4]));
    let rows = load_tokens(&p, &stream(StreamDType::U16, 2)).unwrap();
    let e = rows.check(512, 2, "x").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: row 1, position 1: token 600 is outside the vocabulary 0..512", p.display())
    );
}

#[test]
fn check_refuses_rows_longer_than_the_context() {
    let rows = TokenRows::from_rows(301, vec![0; 301]).unwrap();
    let e = rows.check(512, 256, "the artifact out/tiny (compiled for T <= 256)").unwrap_err();
    assert_eq!(
        e.to_string(),
        "rows have T = 300 new tokens but the artifact out/tiny (compiled for T <= 256) allows at most 256"
    );
    rows.check(512, 300, "x").unwrap();
    // The length is checked before the ids.
    let rows = TokenRows::from_rows(3, vec![9999; 3]).unwrap();
    assert!(matches!(rows.check(512, 1, "x"), Err(DataError::TooLong { t: 2, max_t: 1, .. })));
}

#[test]
fn from_rows_needs_whole_rows_of_two() {
    for (width, len) in [(1usize, 4usize), (0, 0), (0, 3), (3, 4), (2, 0)] {
        let e = TokenRows::from_rows(width, vec![0; len]).unwrap_err();
        assert!(matches!(e, DataError::BadRows { .. }), "{width} {len}: {e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "rows of width {width} from {len} tokens: a row needs at least 2 tokens (one input, one \
                 target) and the tokens must fill at least one row exactly"
            )
        );
    }
    let rows = TokenRows::from_rows(2, vec![1, 2, 3, 4]).unwrap();
    assert_eq!((rows.rows(), rows.width(), rows.dropped(), rows.source()), (2, 2, 0, None));
}

// The perplexity golden's token files (tools/goldens/make_perplexity.py) read as transformers saw them.

#[test]
fn perplexity_golden_token_files_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/goldens/perplexity");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let p = dir.join("tokens.safetensors");
    let rows = load_tokens(&p, &format_for(&p, None, None).unwrap()).unwrap();
    assert_eq!(rows.rows() as u64, meta["rows"]["rows"].as_u64().unwrap());
    assert_eq!(rows.width() as u64, meta["rows"]["width"].as_u64().unwrap());
    assert_eq!(rows.targets(), meta["rows"]["targets"].as_u64().unwrap());
    rows.check(meta["model"]["vocab_size"].as_u64().unwrap(), 32, "the golden").unwrap();

    let seq_len = meta["stream"]["seq_len"].as_u64().unwrap();
    let p = dir.join("tokens_u16.bin");
    let stream = load_tokens(&p, &format_for(&p, StreamDType::parse("u16"), Some(seq_len)).unwrap()).unwrap();
    assert_eq!(stream.rows() as u64, meta["stream"]["rows"].as_u64().unwrap());
    assert_eq!(stream.width() as u64, seq_len + 1);
    assert_eq!(stream.dropped(), meta["stream"]["dropped"].as_u64().unwrap());
    assert_eq!(stream.targets(), meta["stream"]["targets"].as_u64().unwrap());
    // The stream's rows as numpy saw them: row k is tokens 16k ..= 16k + 16.
    let raw = std::fs::read(&p).unwrap();
    let ids: Vec<i64> = raw.chunks_exact(2).map(|b| i64::from(u16::from_le_bytes([b[0], b[1]]))).collect();
    assert_eq!(stream.row(5), &ids[80..97]);
}
