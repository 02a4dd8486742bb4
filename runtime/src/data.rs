//! Token datasets: rows of token ids for `kiln perplexity` (and later `kiln train`).
//!
//! A dataset is [`TokenRows`]: `N` rows of `T + 1` tokens each. A consumer feeds a row's first `T`
//! tokens as inputs and scores its last `T` as targets (`[:, :-1]` and `[:, 1:]`), so every row
//! yields `T` next-token predictions. Two file formats hold them ([`TokenFormat`]):
//!
//! - **safetensors**: one integer tensor named `tokens` of shape `[N, T+1]` (I64, I32, U32, I16, U16
//!   or U8), each row one sequence. The header is validated by [`crate::weights::safetensors`]
//!   before any byte of data is read, so a truncated or corrupt file is an error, never a fault, and
//!   a hostile header length cannot size an allocation.
//! - **a flat stream** (`.bin`): little-endian `u16` or `u32` ids with nothing else in the file, as
//!   llm.c and nanoGPT write them. The element type is not recorded in the file, so the caller must
//!   name it, and the row length `seq_len`. Rows of `seq_len + 1` tokens start every `seq_len`
//!   tokens: consecutive rows share one token (the last target of one row is the first input of the
//!   next), so every token after the first is a target exactly once. Tokens that do not fill a last
//!   row are dropped and counted ([`TokenRows::dropped`]).
//!
//! Files are memory-mapped ([`crate::weights::Mapping`]) and decoded straight into the rows' `i64`s:
//! one pass over the bytes, one copy in memory. [`TokenRows::check`] then checks the ids against a
//! model's vocabulary and the row length against its compiled context.
//!
//! Text becomes rows through [`rows_from_ids`] once the CLI has tokenised it (`kiln train --data
//! FILE.jsonl`). What this does not do: shuffle, batch or pad rows (every row has the same width),
//! or read sharded datasets. Every malformed input is a [`DataError`], never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::weights::mapped::Mapping;
use crate::weights::safetensors::{decode, read_header};
use crate::weights::{HostData, StDType, WeightError};

#[cfg(test)]
mod tests;

/// How a token file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// A safetensors file with an integer tensor `tokens` of shape `[N, T+1]`.
    Safetensors,
    /// A flat little-endian stream of `dtype` ids, cut into rows of `seq_len + 1` tokens that start
    /// every `seq_len` tokens.
    Stream { dtype: StreamDType, seq_len: u64 },
}

/// The element type of a flat token stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamDType {
    U16,
    U32,
}

impl StreamDType {
    /// `u16` or `u32`, as a command line spells them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "u16" => Some(StreamDType::U16),
            "u32" => Some(StreamDType::U32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StreamDType::U16 => "u16",
            StreamDType::U32 => "u32",
        }
    }

    pub fn size_bytes(self) -> u64 {
        match self {
            StreamDType::U16 => 2,
            StreamDType::U32 => 4,
        }
    }
}

impl fmt::Display for StreamDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The safetensors dtypes a `tokens` tensor may have: every integer type whose values fit in `i64`
/// and which a tokenizer's ids plausibly use.
pub const TOKEN_DTYPES: [StDType; 6] =
    [StDType::I64, StDType::I32, StDType::U32, StDType::I16, StDType::U16, StDType::U8];

/// `N` rows of `width = T + 1` token ids, row-major. Invariants: `width >= 2` and `N >= 1`.
///
/// Rows may carry a weight per target ([`TokenRows::with_weights`]): `N * T` finite floats,
/// row-major, the weight of predicting `row[i + 1]` at position `i`. A train step compiled with
/// token-weighted loss reads them as its input `loss_weights` (supervised fine-tuning's assistant
/// mask).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRows {
    width: usize,
    tokens: Vec<i64>,
    weights: Option<Vec<f32>>,
    dropped: u64,
    /// The file the rows came from, named in [`TokenRows::check`]'s errors.
    source: Option<PathBuf>,
}

impl TokenRows {
    /// Rows of `width` tokens from a flat row-major buffer: `width >= 2` (one input and one target)
    /// and `tokens` a non-zero whole number of rows.
    pub fn from_rows(width: usize, tokens: Vec<i64>) -> Result<TokenRows, DataError> {
        if width < 2 || tokens.is_empty() || tokens.len() % width != 0 {
            return Err(DataError::BadRows { width, len: tokens.len() });
        }
        Ok(TokenRows { width, tokens, dropped: 0, source: None, weights: None })
    }

    /// These rows with a weight per target: `weights` holds `N * T` finite floats, row-major.
    pub fn with_weights(mut self, weights: Vec<f32>) -> Result<TokenRows, DataError> {
        let want = self.rows() * (self.width - 1);
        if weights.len() != want {
            return Err(DataError::BadWeights {
                why: format!(
                    "{} weights for {} rows of {} targets",
                    weights.len(),
                    self.rows(),
                    self.width - 1
                ),
            });
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            let t = self.width - 1;
            return Err(DataError::BadWeights {
                why: format!("the weight of row {}, position {} is {}", i / t, i % t, weights[i]),
            });
        }
        self.weights = Some(weights);
        Ok(self)
    }

    /// The weight of every target, row-major, when the rows carry them.
    pub fn weights(&self) -> Option<&[f32]> {
        self.weights.as_deref()
    }

    /// The rows `which`, in that order, as one batch (with their weights). Panics if an index is
    /// out of range, as slice indexing does.
    pub fn select(&self, which: &[usize]) -> TokenRows {
        let t = self.width - 1;
        let tokens = which.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        let weights = self
            .weights
            .as_ref()
            .map(|w| which.iter().flat_map(|&r| w[r * t..(r + 1) * t].iter().copied()).collect());
        TokenRows { width: self.width, tokens, dropped: 0, source: self.source.clone(), weights }
    }

    /// `N`.
    pub fn rows(&self) -> usize {
        self.tokens.len() / self.width
    }

    /// `T + 1`: the tokens in each row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Row `i`'s `T + 1` tokens. Panics if `i >= rows()`, as slice indexing does.
    pub fn row(&self, i: usize) -> &[i64] {
        &self.tokens[i * self.width..(i + 1) * self.width]
    }

    /// Every row, in order.
    pub fn iter(&self) -> std::slice::ChunksExact<'_, i64> {
        self.tokens.chunks_exact(self.width)
    }

    /// All tokens, row-major.
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }

    /// How many next-token predictions the rows hold: `N * T`.
    pub fn targets(&self) -> u64 {
        (self.rows() * (self.width - 1)) as u64
    }

    /// Tokens at the end of a stream that did not fill a row (0 for safetensors files).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The file the rows were read from (`None` for [`TokenRows::from_rows`]).
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Checks that every row's `T = width - 1` is at most `max_t` (`what_limits_t` says what sets
    /// that limit, e.g. "the artifact out/tiny (compiled for T <= 256)") and then that every id lies
    /// in `0..vocab`; the error names the first offender, row-major.
    pub fn check(&self, vocab: u64, max_t: u64, what_limits_t: &str) -> Result<(), DataError> {
        let t = (self.width - 1) as u64;
        if t > max_t {
            return Err(DataError::TooLong {
                file: self.source.clone(),
                t,
                max_t,
                limit: what_limits_t.to_string(),
            });
        }
        let bad = self.tokens.iter().position(|&id| u64::try_from(id).map_or(true, |id| id >= vocab));
        match bad {
            None => Ok(()),
            Some(i) => Err(DataError::OutOfVocab {
                file: self.source.clone(),
                row: i / self.width,
                position: i % self.width,
                token: self.tokens[i],
                vocab,
            }),
        }
    }
}

/// Chooses the format of the token file at `path` from its extension: `.safetensors` is
/// [`TokenFormat::Safetensors`] (and takes neither flag: its rows are its own); `.bin` is a
/// [`TokenFormat::Stream`] and needs both `dtype` and `seq_len >= 1`.
pub fn format_for(
    path: &Path,
    dtype: Option<StreamDType>,
    seq_len: Option<u64>,
) -> Result<TokenFormat, DataError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("safetensors") {
        let unused = match (dtype, seq_len) {
            (Some(_), _) => Some(FLAG_DTYPE),
            (None, Some(_)) => Some(FLAG_SEQ_LEN),
            (None, None) => None,
        };
        return match unused {
            Some(flag) => Err(DataError::UnusedFlag { path: path.to_path_buf(), flag }),
            None => Ok(TokenFormat::Safetensors),
        };
    }
    if !ext.eq_ignore_ascii_case("bin") {
        return Err(DataError::UnknownFormat { path: path.to_path_buf() });
    }
    match (dtype, seq_len) {
        (_, Some(0)) => Err(DataError::ZeroSeqLen { path: path.to_path_buf() }),
        (Some(dtype), Some(seq_len)) => Ok(TokenFormat::Stream { dtype, seq_len }),
        (d, s) => {
            let missing = [d.is_none().then_some(FLAG_DTYPE), s.is_none().then_some(FLAG_SEQ_LEN)];
            Err(DataError::MissingFlags {
                path: path.to_path_buf(),
                missing: missing.into_iter().flatten().collect(),
            })
        }
    }
}

/// How the command line spells the stream flags, for errors.
const FLAG_DTYPE: &str = "--dtype u16|u32";
const FLAG_SEQ_LEN: &str = "--seq-len N";

/// Reads the token file at `path` as `format`.
pub fn load_tokens(path: &Path, format: &TokenFormat) -> Result<TokenRows, DataError> {
    if let TokenFormat::Stream { seq_len: 0, .. } = format {
        return Err(DataError::ZeroSeqLen { path: path.to_path_buf() });
    }
    let map = open(path)?;
    if map.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    let mut rows = match *format {
        TokenFormat::Safetensors => read_safetensors(&map)?,
        TokenFormat::Stream { dtype, seq_len } => read_stream(path, map.bytes(), dtype, seq_len)?,
    };
    rows.source = Some(path.to_path_buf());
    Ok(rows)
}

/// Maps the file, refusing a directory by name (mapping one fails with an unhelpful "no such
/// device").
fn open(path: &Path) -> Result<std::sync::Arc<Mapping>, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    if std::fs::metadata(path).map_err(io)?.is_dir() {
        return Err(io(std::io::Error::other("is a directory, not a token file")));
    }
    Mapping::open(path).map_err(|e| match e {
        WeightError::Io { source, .. } => io(source),
        other => DataError::Safetensors(other),
    })
}

fn read_safetensors(map: &Mapping) -> Result<TokenRows, DataError> {
    let path = map.path();
    let entries = read_header(map).map_err(DataError::Safetensors)?;
    let Some(e) = entries.iter().find(|e| e.name == "tokens") else {
        let mut found: Vec<String> = entries.into_iter().map(|e| e.name).collect();
        found.sort();
        return Err(DataError::NoTokens { path: path.to_path_buf(), found });
    };
    if !TOKEN_DTYPES.contains(&e.dtype) {
        return Err(DataError::WrongDType { path: path.to_path_buf(), dtype: e.dtype });
    }
    let bad_shape = || DataError::BadShape { path: path.to_path_buf(), shape: e.shape.clone() };
    let &[n, width] = e.shape.as_slice() else { return Err(bad_shape()) };
    if n == 0 || width < 2 {
        return Err(bad_shape());
    }
    // The header was validated against the file's length: the range is inside the mapping and is
    // `n * width` elements long, so neither the slice nor the decoded vector can exceed the file.
    let bytes = usize::try_from(e.begin)
        .ok()
        .zip(usize::try_from(e.end).ok())
        .and_then(|(b, end)| map.bytes().get(b..end))
        .ok_or_else(bad_shape)?;
    let tokens = match decode("tokens", e.dtype, bytes).map_err(DataError::Safetensors)? {
        (_, HostData::I64(v)) => v,
        // Every accepted dtype is an integer type, which decodes to i64.
        (_, HostData::F32(_)) => {
            return Err(DataError::WrongDType { path: path.to_path_buf(), dtype: e.dtype })
        }
    };
    let width = usize::try_from(width).map_err(|_| bad_shape())?;
    Ok(TokenRows { width, tokens, dropped: 0, source: None, weights: None })
}

fn read_stream(path: &Path, bytes: &[u8], dtype: StreamDType, seq_len: u64) -> Result<TokenRows, DataError> {
    let size = dtype.size_bytes();
    let len = bytes.len() as u64;
    if len % size != 0 {
        return Err(DataError::StreamLength { path: path.to_path_buf(), bytes: len, dtype });
    }
    let n = len / size;
    let short = || DataError::StreamShort { path: path.to_path_buf(), tokens: n, dtype, seq_len };
    // A row needs `seq_len + 1 <= n` tokens; checked before anything is allocated.
    let width = seq_len.checked_add(1).filter(|&w| w <= n).ok_or_else(short)?;
    // Row k covers tokens k*seq_len ..= k*seq_len + seq_len, so rows = floor((n - 1) / seq_len).
    let rows = (n - 1) / seq_len;
    let used = rows * seq_len + 1;
    let (width, seq) = (width as usize, seq_len as usize);
    let at = |i: usize| -> i64 {
        let i = i * size as usize;
        match dtype {
            StreamDType::U16 => i64::from(u16::from_le_bytes([bytes[i], bytes[i + 1]])),
            StreamDType::U32 => {
                i64::from(u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]))
            }
        }
    };
    // `rows * width <= n + rows`, so this is bounded by the file's length.
    let mut tokens = Vec::with_capacity(rows as usize * width);
    for k in 0..rows as usize {
        tokens.extend((k * seq..k * seq + width).map(at));
    }
    Ok(TokenRows { width, tokens, dropped: n - used, source: None, weights: None })
}

/// Rows of `seq_len + 1` tokens cut from a stream of ids as from a `.bin` stream (rows start every
/// `seq_len` tokens, consecutive rows share one token, a remainder that does not fill a row is
/// dropped and counted): what text data becomes once tokenised. `what` names the stream in errors.
pub fn rows_from_ids(what: &Path, ids: &[i64], seq_len: u64) -> Result<TokenRows, DataError> {
    if seq_len == 0 {
        return Err(DataError::ZeroSeqLen { path: what.to_path_buf() });
    }
    let n = ids.len() as u64;
    let short = || DataError::TextShort { path: what.to_path_buf(), tokens: n, seq_len };
    let width = seq_len.checked_add(1).filter(|&w| w <= n).ok_or_else(short)? as usize;
    let rows = ((n - 1) / seq_len) as usize;
    let seq = seq_len as usize;
    let mut tokens = Vec::with_capacity(rows * width);
    for k in 0..rows {
        tokens.extend_from_slice(&ids[k * seq..k * seq + width]);
    }
    let dropped = n - (rows as u64 * seq_len + 1);
    Ok(TokenRows { width, tokens, dropped, source: Some(what.to_path_buf()), weights: None })
}

/// Everything that can be wrong with a token file or its rows.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("bad target weights: {why}")]
    BadWeights { why: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: the text is {tokens} tokens long, too short for one row of --seq-len {seq_len} + 1 tokens",
        path.display()
    )]
    TextShort { path: PathBuf, tokens: u64, seq_len: u64 },
    #[error("{}: the file is empty; a token file holds at least one row of two tokens", path.display())]
    Empty { path: PathBuf },
    #[error(
        "{}: unknown token file format: expected a .safetensors file (an integer tensor `tokens` of \
         shape [N, T+1]) or a .bin stream of little-endian token ids (with {FLAG_DTYPE} and {FLAG_SEQ_LEN})",
        path.display()
    )]
    UnknownFormat { path: PathBuf },
    #[error(
        "{}: a .bin token stream needs {}: the file holds only the ids, not their type or the row length",
        path.display(), missing.join(" and ")
    )]
    MissingFlags { path: PathBuf, missing: Vec<&'static str> },
    #[error(
        "{}: {flag} applies only to .bin token streams; a .safetensors file's `tokens` tensor has its own \
         rows",
        path.display()
    )]
    UnusedFlag { path: PathBuf, flag: &'static str },
    #[error("{}: --seq-len is 0; a row needs at least one target, so it must be at least 1", path.display())]
    ZeroSeqLen { path: PathBuf },

    // Safetensors files.
    #[error("{0}")]
    Safetensors(#[source] WeightError),
    #[error(
        "{}: no tensor `tokens`; the file has {}; a token file holds an integer tensor `tokens` of shape \
         [N, T+1]",
        path.display(), Names(found)
    )]
    NoTokens { path: PathBuf, found: Vec<String> },
    #[error(
        "{}: tensor `tokens` is {dtype}; token ids must be one of {}",
        path.display(), DTypes(&TOKEN_DTYPES)
    )]
    WrongDType { path: PathBuf, dtype: StDType },
    #[error(
        "{}: tensor `tokens` has shape {shape:?}; expected [N, T+1] with N >= 1 rows of T+1 >= 2 tokens \
         (inputs are [:, :-1], targets [:, 1:])",
        path.display()
    )]
    BadShape { path: PathBuf, shape: Vec<u64> },

    // Streams.
    #[error(
        "{}: {bytes} bytes is not a whole number of {dtype} tokens ({} bytes each); is --dtype right?",
        path.display(), dtype.size_bytes()
    )]
    StreamLength { path: PathBuf, bytes: u64, dtype: StreamDType },
    #[error(
        "{}: the stream has {tokens} {dtype} token(s) but one row of --seq-len {seq_len} needs {}",
        path.display(), u128::from(*seq_len) + 1
    )]
    StreamShort { path: PathBuf, tokens: u64, dtype: StreamDType, seq_len: u64 },

    // Rows.
    #[error(
        "rows of width {width} from {len} tokens: a row needs at least 2 tokens (one input, one target) and \
         the tokens must fill at least one row exactly"
    )]
    BadRows { width: usize, len: usize },
    #[error(
        "{}row {row}, position {position}: token {token} is outside the vocabulary 0..{vocab}",
        InFile(file)
    )]
    OutOfVocab { file: Option<PathBuf>, row: usize, position: usize, token: i64, vocab: u64 },
    #[error("{}rows have T = {t} new tokens but {limit} allows at most {max_t}", InFile(file))]
    TooLong { file: Option<PathBuf>, t: u64, max_t: u64, limit: String },
}

/// `path: `, or nothing for rows that came from no file.
struct InFile<'a>(&'a Option<PathBuf>);

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}: ", p.display()),
            None => Ok(()),
        }
    }
}

/// Tensor names as `` `a`, `b` ``, at most ten, or "no tensors".
struct Names<'a>(&'a [String]);

impl fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LISTED: usize = 10;
        if self.0.is_empty() {
            return f.write_str("no tensors");
        }
        for (i, n) in self.0.iter().take(LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{n}`")?;
        }
        if self.0.len() > LISTED {
            write!(f, " and {} more", self.0.len() - LISTED)?;
        }
        Ok(())
    }
}

/// `I64, I32, ... or U8`.
struct DTypes<'a>(&'a [StDType]);

impl fmt::Display for DTypes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            match i {
                0 => {}
                _ if i + 1 == self.0.len() => f.write_str(" or ")?,
                _ => f.write_str(", ")?,
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
