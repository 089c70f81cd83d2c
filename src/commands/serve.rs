//! `mfx serve`: the model behind an OpenAI- and Anthropic-compatible HTTP API.
//!
//! Binds to 127.0.0.1 unless told otherwise: the server has no TLS and, by
//! default, no key, so exposing it is an explicit choice (`--host 0.0.0.0
//! --api-key ...`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use mfx_runtime::chat::ChatTemplate;
use mfx_runtime::server::engine::GeneratorBackend;
use mfx_runtime::server::{run_blocking, ServerConfig};

use mfx_runtime::models::{KvBits, LoadOptions};
use mfx_runtime::prompt_cache::SlotOptions;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (Hugging Face or MLX layout) or `.mfx` pack.
    pub model: PathBuf,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub cache: super::args::CacheArgs,
    /// Require this key as `Authorization: Bearer KEY` or `x-api-key: KEY`.
    /// (The environment's value is never shown in `--help`.)
    #[arg(long, env = "MFX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait while one generates; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Render chats with this Jinja template instead of the model's own
    /// (e.g. a tool-calling template).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// The model name reported to clients (default: the model's file or folder name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// KV cache precision in bits: 16 (f16) or 8 (int8 per vector).
    #[arg(long, default_value = "16")]
    pub kv_bits: KvBits,
    /// Cap on the context length (default: the model's).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Let browser apps on these origins call the API (CORS), e.g.
    /// `http://localhost:3000` for Open WebUI; comma-separated, `*` for any.
    /// Off by default.
    #[arg(long, value_name = "ORIGINS", value_delimiter = ',')]
    pub cors: Vec<String>,
    /// Prompt-cache slots: other sessions' KV (and recurrent) state kept
    /// besides the live one, least recently used out, so an agent's main
    /// conversation survives its side requests. 0 keeps one session.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub prompt_slots: usize,
    /// RAM for the slots, part of --ram's budget (default: 1/8 of --ram, or
    /// of the detected budget). The expert cache keeps at least its
    /// minimum: the slots get what the budget holds above it, up to this.
    #[arg(long, value_name = "SIZE", value_parser = super::args::size)]
    pub slot_ram: Option<u64>,
    /// Spill evicted slots to this directory and read them back on a prefix
    /// hit; also keeps the sessions across restarts (files are tied to the
    /// model, KV precision and kernels, and checksummed). Off by default.
    #[arg(long, value_name = "DIR")]
    pub slot_dir: Option<PathBuf>,
    /// Most bytes of slot files kept in --slot-dir (least recently used
    /// deleted first).
    #[arg(long, value_name = "SIZE", value_parser = super::args::size, default_value = "16G")]
    pub slot_disk: u64,
    /// Hybrid models (qwen3_next, qwen3_5_moe): checkpoint the recurrent
    /// state every this many prefill chunks (and at each prompt's last whole
    /// chunk), so a history that changes late resumes from the checkpoint
    /// before the change.
    #[arg(long, value_name = "CHUNKS", default_value_t = 4)]
    pub checkpoint_every: usize,
    /// Prompt positions per forward pass during prefill; also the grid of
    /// reusable positions (a reused prefix is a whole number of chunks, so
    /// a prompt's output never depends on what ran before).
    #[arg(long, value_name = "N", default_value_t = mfx_runtime::models::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub draft: super::args::DraftArgs,
}

pub fn run(args: Args) -> Result<()> {
    let mut cache = args.cache.options();
    let slot_ram = if args.prompt_slots == 0 {
        0
    } else {
        args.slot_ram.unwrap_or_else(|| {
            cache
                .ram
                .or_else(mfx_runtime::cache::detect_budget)
                .map_or(0, |b| b / 8)
        })
    };
    cache.slot_bytes = slot_ram;
    let template = match &args.chat_template {
        None => None,
        Some(path) => {
            let src = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(ChatTemplate::new(
                src,
                path.display().to_string(),
                None,
                None,
            )?)
        }
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let p = args
            .model
            .canonicalize()
            .unwrap_or_else(|_| args.model.clone());
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mfx".into())
    });
    let backend = GeneratorBackend::load(
        &args.model,
        &LoadOptions {
            kv_bits: args.kv_bits,
            max_context: args.max_context,
            prefill_chunk: Some(args.prefill_chunk.max(1)),
            cache,
        },
        model_id,
        template,
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    backend.configure(|g| {
        g.set_speculation(args.draft.options());
        // Under a pack's budget the grant (possibly less) limits the slots.
        g.set_slots(SlotOptions {
            slots: args.prompt_slots,
            ram_bytes: slot_ram,
            dir: args.slot_dir.clone(),
            disk_bytes: args.slot_disk,
            checkpoint_every: args.checkpoint_every,
            ..SlotOptions::default()
        });
        let granted = g.expert_cache().map_or(slot_ram, |c| c.slot_ram());
        if args.prompt_slots > 0 {
            eprintln!(
                "mfx serve: {} prompt-cache slots in {}{}",
                args.prompt_slots,
                mfx_runtime::cache::size::human(granted),
                args.slot_dir
                    .as_ref()
                    .map_or(String::new(), |d| format!(", spilled to {}", d.display()))
            );
        }
    });
    let config = ServerConfig {
        api_key: args.api_key.clone(),
        max_queue: args.max_queue,
        cors_origins: args.cors.clone(),
        ..ServerConfig::default()
    };
    // The access log (one line per request, target `mfx::access`) and the
    // runtime's warnings, on stderr.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .try_init();
    if let Some(warning) = exposure_warning(&args.host, args.api_key.is_some()) {
        eprintln!("{warning}");
    }
    if let Some(warning) = context_warning(args.max_context, backend.trained_context()) {
        eprintln!("{warning}");
    }
    let addr = if args.host.contains(':') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    let backend = Arc::new(backend);
    run_blocking(backend.clone(), &config, &addr)?;
    // Stopped by Ctrl-C or SIGTERM: with a slot directory the sessions (the
    // live one and every slot) are written there for the next start.
    if args.slot_dir.is_some() {
        backend.configure(|g| g.persist_slots());
    }
    Ok(())
}

/// A warning when `--max-context` is above the positions the model was
/// trained on. Allowed, as llama.cpp allows `-c` above `n_ctx_train` with a
/// warning (vLLM refuses unless told to): agent clients send 5-20K-token
/// prompts that a small model's trained context cannot hold, and the wire
/// protocol can be tested there; but the text past the trained length is
/// not what the model learned, so the user is told, once, at start.
fn context_warning(requested: Option<usize>, trained: usize) -> Option<String> {
    let requested = requested?;
    (requested > trained).then(|| {
        format!(
            "mfx serve: WARNING: --max-context {requested} is beyond the {trained} positions this model \
             was trained on (max_position_embeddings); output past position {trained} is \
             extrapolated and may degrade."
        )
    })
}

/// A warning when the server listens beyond this machine without a key:
/// anyone who can reach the port can then use (and load) the model.
fn exposure_warning(host: &str, has_key: bool) -> Option<String> {
    if has_key {
        return None;
    }
    let loopback = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    (!loopback).then(|| {
        format!(
            "mfx serve: WARNING: listening on {host} without an API key: anyone who can reach this \
             port can use the model. Set --api-key (or MFX_API_KEY), or bind 127.0.0.1."
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{context_warning, exposure_warning};

    #[test]
    fn max_context_beyond_trained_warns() {
        let w = context_warning(Some(32768), 4096).expect("a warning");
        assert!(w.contains("32768") && w.contains("4096"), "{w}");
        assert_eq!(context_warning(Some(4096), 4096), None);
        assert_eq!(context_warning(Some(1024), 4096), None);
        assert_eq!(context_warning(None, 4096), None);
    }

    #[test]
    fn non_loopback_host_without_key_warns() {
        for host in ["0.0.0.0", "::", "192.168.1.5", "example.org"] {
            assert!(exposure_warning(host, false).is_some(), "{host}");
            assert!(exposure_warning(host, true).is_none(), "{host}");
        }
        for host in ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"] {
            assert!(exposure_warning(host, false).is_none(), "{host}");
        }
    }
}
