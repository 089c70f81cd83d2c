//! The budget's view of a model: each family's [`WorkingShape`] (what it
//! needs in memory besides weights, so that `--ram` leaves room for its KV
//! cache and prompt activations; each family computes its own in its file)
//! turned into the expert cache's options and the resident check.

use super::decoder::ModelConfig;
use super::family::FamilyConfig;
use super::DEFAULT_PREFILL_CHUNK;
use super::{KvBits, LoadOptions};
use crate::cache::{WorkingShape, RESERVED_CONTEXT_DEFAULT};

/// The shared-decoder families (qwen3_moe, qwen2_moe, mixtral, olmoe).
pub fn decoder(c: &ModelConfig, kv: KvBits) -> WorkingShape {
    super::decoder::working_shape(c, kv)
}

/// Any family (each family's [`super::Family::working_shape`]).
pub fn family(c: &FamilyConfig, kv: KvBits) -> WorkingShape {
    c.working_shape(kv)
}

/// `opts.cache` with the working set of a model of this shape filled in:
/// what the loader hands the expert cache.
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
