//! Each family's [`WorkingShape`]: what it needs in memory besides weights,
//! so that `--ram` leaves room for its KV cache and prompt activations.

use super::family::FamilyConfig;
use super::{KvBits, LoadOptions};
use crate::cache::{WorkingShape, RESERVED_CONTEXT_DEFAULT};
use crate::config::ModelConfig;
use crate::generate::DEFAULT_PREFILL_CHUNK;

/// Bytes of one cached key or value vector of `dim` elements.
fn kv_vector(bits: KvBits, dim: usize) -> u64 {
    match bits {
        KvBits::F16 => 2 * dim as u64,
        // int8 codes plus one f32 scale per vector.
        KvBits::Q8 => dim as u64 + 4,
    }
}

/// The shared-decoder families (qwen3_moe, qwen2_moe, mixtral, olmoe).
pub fn decoder(c: &ModelConfig, kv: KvBits) -> WorkingShape {
    let dense_mlp = if !c.mlp_only_layers.is_empty() || c.decoder_sparse_step > 1 {
        c.intermediate_size
    } else {
        0
    };
    WorkingShape {
        hidden: c.hidden_size as u64,
        vocab: c.vocab_size as u64,
        kv_bytes_per_token: c.num_hidden_layers as u64
            * 2
            * c.num_key_value_heads as u64
            * kv_vector(kv, c.head_dim),
        state_bytes: 0,
        qkv: ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim) as u64,
        top_k: c.num_experts_per_tok as u64,
        expert_inter: c.moe_intermediate_size as u64,
        shared_inter: c.shared_expert_intermediate_size.max(dense_mlp) as u64,
        experts: c.num_experts as u64,
    }
}

/// Any family.
pub fn family(c: &FamilyConfig, kv: KvBits) -> WorkingShape {
    match c {
        FamilyConfig::Decoder(c) => decoder(c, kv),
        FamilyConfig::Glm4(c) => WorkingShape {
            hidden: c.hidden_size as u64,
            vocab: c.vocab_size as u64,
            kv_bytes_per_token: c.num_hidden_layers as u64
                * 2
                * c.kv_heads as u64
                * kv_vector(kv, c.head_dim),
            state_bytes: 0,
            qkv: ((c.heads + 2 * c.kv_heads) * c.head_dim) as u64,
            top_k: c.routing.top_k as u64,
            expert_inter: c.moe_intermediate_size as u64,
            shared_inter: (c.n_shared_experts * c.moe_intermediate_size).max(c.intermediate_size)
                as u64,
            experts: c.n_routed_experts as u64,
        },
        // MLA: keys and values are cached expanded, per head.
        FamilyConfig::Deepseek(c) => WorkingShape {
            hidden: c.hidden_size as u64,
            vocab: c.vocab_size as u64,
            kv_bytes_per_token: c.num_hidden_layers as u64
                * 2
                * c.heads as u64
                * kv_vector(kv, c.qk_head_dim()),
            state_bytes: 0,
            qkv: (3 * c.heads * c.qk_head_dim() + c.kv_lora_rank + c.q_lora_rank.unwrap_or(0))
                as u64,
            top_k: c.routing.top_k as u64,
            expert_inter: c.ffn.moe_intermediate as u64,
            shared_inter: (c.ffn.n_shared * c.ffn.moe_intermediate).max(c.ffn.intermediate) as u64,
            experts: c.ffn.n_routed as u64,
        },
        // Full-attention layers keep an f32 KV cache; DeltaNet layers a fixed
        // recurrent state (value heads x k_dim x v_dim) and a conv window.
        FamilyConfig::Next(c) => {
            let full = c.full_attention.iter().filter(|&&f| f).count() as u64;
            let linear = c.num_hidden_layers as u64 - full;
            let conv_width = 2 * c.lin_k_heads * c.lin_k_dim + c.lin_v_heads * c.lin_v_dim;
            let state = c.lin_v_heads * c.lin_k_dim * c.lin_v_dim + c.conv_kernel * conv_width;
            WorkingShape {
                hidden: c.hidden_size as u64,
                vocab: c.vocab_size as u64,
                kv_bytes_per_token: full * 2 * (c.kv_heads * c.head_dim) as u64 * 4,
                state_bytes: linear * 4 * state as u64,
                qkv: ((2 * c.heads + 2 * c.kv_heads) * c.head_dim)
                    .max(conv_width + c.lin_v_heads * c.lin_v_dim) as u64,
                top_k: c.top_k as u64,
                expert_inter: c.moe_intermediate_size as u64,
                shared_inter: c.shared_expert_intermediate_size as u64,
                experts: c.num_experts as u64,
            }
        }
    }
}

/// `opts.cache` with the working set of a model of this shape filled in:
/// what both pack loaders (shared decoder and own-type families) hand the
/// expert cache.
pub fn cache_options(
    shape: &WorkingShape,
    max_position: usize,
    opts: &LoadOptions,
) -> crate::cache::CacheOptions {
    crate::cache::CacheOptions {
        working_bytes: Some(bytes(shape, max_position, opts)),
        top_k: shape.top_k as usize,
        ..opts.cache.clone()
    }
}

/// The working bytes `opts` will need for a model of this shape whose
/// trained context is `max_position`: the context is `--max-context`, else
/// [`RESERVED_CONTEXT_DEFAULT`] (capped by the model's own); the thread
/// count is the current rayon pool's.
pub fn bytes(shape: &WorkingShape, max_position: usize, opts: &LoadOptions) -> u64 {
    let context = context(opts, max_position);
    let chunk = opts.prefill_chunk.unwrap_or(DEFAULT_PREFILL_CHUNK);
    shape.bytes(context, chunk, rayon::current_num_threads())
}

/// `opts` with the context the budget covers made the context the model
/// accepts: without `--max-context`, a budgeted model reserves KV cache for
/// [`RESERVED_CONTEXT_DEFAULT`] positions, so it must not grow past them
/// (a session that did would outgrow `--ram`). The error at that point
/// names the limit; `--max-context N` raises it and the reserve with it.
pub fn budgeted(opts: &LoadOptions, max_position: usize) -> LoadOptions {
    LoadOptions {
        max_context: Some(context(opts, max_position)),
        ..opts.clone()
    }
}

fn context(opts: &LoadOptions, max_position: usize) -> usize {
    opts.max_context
        .unwrap_or(RESERVED_CONTEXT_DEFAULT.min(max_position.max(1)))
}

/// A checkpoint directory's `--ram`: its tensors are all resident (mapped;
/// a memory cgroup charges mapped file pages as it does owned memory), so
/// the budget must hold the files' bytes plus the working reserve, or it is
/// refused with the minimum. With `--ram` the context is capped as in
/// [`budgeted`]; without it nothing changes.
pub fn check_resident(
    dir: &std::path::Path,
    shape: &WorkingShape,
    max_position: usize,
    opts: &LoadOptions,
) -> Result<LoadOptions, crate::error::RuntimeError> {
    if opts.cache.ram.is_none() {
        return Ok(opts.clone());
    }
    let dir = if dir.is_file() {
        dir.parent().unwrap_or(std::path::Path::new("."))
    } else {
        dir
    };
    let weights: u64 = std::fs::read_dir(dir)
        .map_err(|e| crate::error::RuntimeError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let opts = budgeted(opts, max_position);
    let working = bytes(shape, max_position, &opts);
    crate::cache::check_resident_budget(dir, opts.cache.ram, weights, working).map_err(|e| {
        crate::error::RuntimeError::Budget {
            budget: e,
            hint: " (a checkpoint directory keeps every expert resident; `mfx prep` makes a pack that streams them)".into(),
        }
    })?;
    Ok(opts)
}
