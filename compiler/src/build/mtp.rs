//! Multi-token prediction modules (reference §5; DeepSeek-V3 report eqs. 21–23).
//!
//! Module `k` of depth `D` is stored as layer `L + k - 1` (`model.layers.61` for V3):
//!
//! ```text
//! h'  = eh_proj(concat([enorm(embed(tokens_k)), hnorm(h_prev)], axis 2))
//! h   = decoder_layer_{L+k-1}(h')              (MoE by the same rule as the main layers)
//! out = lm_head(shared_head.norm(h))           in f32
//! ```
//!
//! The concatenation puts the embedding first, as vLLM's `deepseek_mtp.py` does
//! (`torch.cat([inputs_embeds, previous_hidden_states], dim=-1)`); the report's eq. 21 writes the
//! hidden state first (reference D9). The checkpoint's order is what matters for `eh_proj`, and vLLM
//! loads the released weights, so kiln follows vLLM.
//!
//! The embedding and the output head are the main model's (the report shares both). The checkpoint
//! also stores a copy of the head as `model.layers.61.shared_head.head.weight`; kiln reads the shared
//! `lm_head.weight` and has no param for the copy.
//!
//! Not modelled: vLLM zeroes the embedding at position 0 (`inputs_embeds[positions == 0] = 0`) for
//! its speculative-decoding setup. The report's equations have no such mask, so kiln leaves it out.

use kiln_ir::op::Op;
use kiln_ir::ValueId;

use super::{BuildError, Builder};

/// Name of the token input of MTP module `k` (1-based) in a model of MTP depth `depth`:
/// `mtp_tokens` when the depth is 1, `mtp_tokens.{k}` otherwise.
pub fn mtp_tokens_name(depth: u64, k: u64) -> String {
    if depth == 1 {
        "mtp_tokens".to_string()
    } else {
        format!("mtp_tokens.{k}")
    }
}

/// Name of the logits output of MTP module `k`: `mtp_logits` or `mtp_logits.{k}`, as for the inputs.
pub fn mtp_logits_name(depth: u64, k: u64) -> String {
    if depth == 1 {
        "mtp_logits".to_string()
    } else {
        format!("mtp_logits.{k}")
    }
}

/// MTP module `k` (1-based): returns its block output (read by module `k + 1`) and its f32 logits.
pub(super) fn module(
    b: &mut Builder,
    k: u64,
    h_prev: ValueId,
    positions: ValueId,
    tokens: ValueId,
) -> Result<(ValueId, ValueId), BuildError> {
    let h = block(b, k, h_prev, positions, tokens)?;
    let logits = head(b, k, h)?;
    Ok((h, logits))
}

/// MTP module `k`'s block output (as [`module`] returns it) alone, without its head: the draft
/// program takes one position per sequence to the head ([`head`]).
pub(super) fn block(
    b: &mut Builder,
    k: u64,
    h_prev: ValueId,
    positions: ValueId,
    tokens: ValueId,
) -> Result<ValueId, BuildError> {
    let layer = b.spec.model.num_hidden_layers + k - 1;
    let scope = format!("model.layers.{layer}");
    let d = b.spec.model.hidden_size;
    let table = b.embed_table()?;
    let emb = b.op(&scope, Op::Embedding, &[table, tokens])?;
    let emb = b.rms_norm(&scope, "enorm.weight", emb)?;
    let hp = b.rms_norm(&scope, "hnorm.weight", h_prev)?;
    let cat = b.op(&scope, Op::Concat { axis: 2 }, &[emb, hp])?;
    let h = b.linear(&scope, "eh_proj.weight", cat, d, super::mul(2, d)?)?;
    super::decoder_layer(b, layer, h, positions)
}

/// MTP module `k`'s f32 logits from its block output `h`: `lm_head(shared_head.norm(h))`.
pub(super) fn head(b: &mut Builder, k: u64, h: ValueId) -> Result<ValueId, BuildError> {
    let layer = b.spec.model.num_hidden_layers + k - 1;
    let head_scope = format!("model.layers.{layer}.shared_head");
    let normed = b.rms_norm(&head_scope, "norm.weight", h)?;
    b.lm_head(&head_scope, normed)
}
