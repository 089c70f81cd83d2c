//! [`Backend`] over the real engine, [`Generator`].
//!
//! The generator (model, KV state, sampler) sits behind a mutex that only
//! the server's worker thread takes, one request at a time, so the KV state
//! of the last request survives to the next and `Generator::generate`
//! reuses the longest common token prefix (a multi-turn agent session
//! re-processes only its new turn). Rendering and tokenizing use their own
//! tokenizer and template, so requests waiting in the queue are validated
//! (context length, template errors) without waiting for the generator.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use super::backend::{
    Backend, BackendError, ChatPrompt, Completion, Delta, Finish, GenParams, Logprob, ModelInfo,
    SamplingDefaults, StatsSnapshot,
};
use crate::chat::{ChatTemplate, RenderOptions};
use crate::constrain::{ConstrainError, Grammar, GrammarEnv};
use crate::generate::{Event, FinishReason, GenerateError, GenerateOptions, Generator};
use crate::models::LoadOptions;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::toolcall::ChatFormat;

pub struct GeneratorBackend {
    gen: Mutex<Generator>,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    info: ModelInfo,
    /// The model's full defaults (min_p, repetition penalty …), which
    /// requests override field by field.
    sampling: SamplingParams,
    /// The cache counters as of the last time the generator was free, for
    /// `/metrics` calls that arrive while it generates.
    last_stats: Mutex<Option<StatsSnapshot>>,
    /// The prompt cache's counters, likewise.
    last_slots: Mutex<Option<crate::prompt_cache::SlotStats>>,
    /// Decode with special tokens kept: the template's output format needs
    /// markers the tokenizer has as special tokens (see [`keeps_special`]).
    keep_special: bool,
    /// The tokenizer's special tokens, read once (every forced call asks).
    special: Vec<String>,
    /// The generator's end-of-sequence ids and logits width, for the
    /// grammar's token trie (read once: the generator is locked while it
    /// generates, and grammars compile while requests wait).
    eos_ids: Vec<u32>,
    vocab: usize,
    /// The token trie, built on the first constrained request.
    grammar_env: OnceLock<Result<Arc<GrammarEnv>, String>>,
}

/// Whether output in the format `template` teaches must be decoded with
/// special tokens kept: harmony's `<|channel|>`… are special tokens, and so
/// may be a family's tool-call or `<think>` markers; dropped, the output
/// could no longer be split into reasoning, text and calls. (Qwen's
/// `<tool_call>` and `<think>` are added but not special, so Qwen output
/// keeps dropping `<|im_start|>` and friends.)
fn keeps_special(template: Option<&ChatTemplate>, special: &[String]) -> bool {
    let Some(t) = template else {
        return false;
    };
    let format = ChatFormat::detect(Some(t.source()), "");
    if format == ChatFormat::Harmony {
        return true;
    }
    format
        .markers()
        .iter()
        .any(|m| special.iter().any(|s| s == m))
}

/// The text of every added token the tokenizer calls special.
fn special_tokens(tokenizer: &Tokenizer) -> Vec<String> {
    tokenizer
        .inner()
        .get_added_tokens_decoder()
        .into_values()
        .filter(|t| t.special)
        .map(|t| t.content)
        .collect()
}

impl GeneratorBackend {
    /// Loads a model directory or `.mfx` pack. `template` replaces the
    /// model's own chat template (e.g. a tool-calling one for a model that
    /// ships a plain ChatML template).
    pub fn load(
        path: &Path,
        opts: &LoadOptions,
        model_id: String,
        template: Option<ChatTemplate>,
    ) -> Result<Self, GenerateError> {
        let gen = Generator::load(path, opts)?;
        let template = match template {
            Some(t) => Some(t),
            None => load_template(path)?,
        };
        Ok(Self::new(gen, template, model_id))
    }

    /// The positions the model was trained on (its config's
    /// `max_position_embeddings`); `info().context_length` may be larger
    /// when `--max-context` asked for it.
    pub fn trained_context(&self) -> usize {
        match self.gen.lock() {
            Ok(g) => g.model_info().max_position_embeddings,
            Err(poisoned) => poisoned.into_inner().model_info().max_position_embeddings,
        }
    }

    /// Wraps a generator; `template` is the one requests are rendered with.
    pub fn new(gen: Generator, template: Option<ChatTemplate>, model_id: String) -> Self {
        let tokenizer = gen.tokenizer().clone();
        let sampling = gen.default_sampling();
        let info = ModelInfo {
            id: model_id,
            context_length: gen.model_info().max_context,
            defaults: SamplingDefaults {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
            },
        };
        let last_stats = Mutex::new(gen.cache_stats());
        let last_slots = Mutex::new(slot_stats(&gen));
        let special = special_tokens(&tokenizer);
        let keep_special = keeps_special(template.as_ref(), &special);
        Self {
            keep_special,
            special,
            eos_ids: gen.eos_ids().to_vec(),
            vocab: gen.model_info().vocab_size,
            grammar_env: OnceLock::new(),
            gen: Mutex::new(gen),
            tokenizer,
            template,
            info,
            sampling,
            last_stats,
            last_slots,
        }
    }
}

/// A second copy of the model's chat template (the generator keeps its own
/// behind the mutex), from the same place `Generator::load` reads it.
fn load_template(path: &Path) -> Result<Option<ChatTemplate>, GenerateError> {
    if path.is_dir() {
        return Ok(ChatTemplate::from_model_dir(path)?);
    }
    if path.file_name().is_some_and(|n| n == "config.json") {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok(ChatTemplate::from_model_dir(dir)?);
    }
    let pack = mfx_formats::Pack::open(path)?;
    let origin = format!("{} (chat_template)", path.display());
    match &pack.manifest().chat_template {
        Some(src) => Ok(Some(ChatTemplate::new(src.clone(), origin, None, None)?)),
        None => Ok(None),
    }
}

fn invalid(e: impl std::fmt::Display) -> BackendError {
    BackendError::Invalid(e.to_string())
}

/// The generator's slot counters, when it keeps slots.
fn slot_stats(gen: &Generator) -> Option<crate::prompt_cache::SlotStats> {
    gen.slots_enabled().then(|| gen.slot_stats())
}

impl GeneratorBackend {
    /// Runs `f` on the generator before serving (prompt-cache slots,
    /// `mfx serve`'s options).
    pub fn configure(&self, f: impl FnOnce(&mut Generator)) {
        let mut g = match self.gen.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        if let Ok(mut last) = self.last_slots.lock() {
            *last = slot_stats(&g);
        }
    }

    fn remember_stats(&self, stats: Option<StatsSnapshot>) {
        if let Ok(mut last) = self.last_stats.lock() {
            *last = stats;
        }
    }
}

impl Backend for GeneratorBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Fresh when the generator is free; while it generates, the numbers
    /// from the end of the previous generation (waiting for the lock would
    /// hold `/metrics` until the generation ends).
    fn cache_stats(&self) -> Option<StatsSnapshot> {
        if let Ok(gen) = self.gen.try_lock() {
            let stats = gen.cache_stats();
            self.remember_stats(stats);
            return stats;
        }
        self.last_stats.lock().ok().and_then(|s| *s)
    }

    fn slot_stats(&self) -> Option<crate::prompt_cache::SlotStats> {
        if let Ok(gen) = self.gen.try_lock() {
            let stats = slot_stats(&gen);
            if let Ok(mut last) = self.last_slots.lock() {
                *last = stats.clone();
            }
            return stats;
        }
        self.last_slots.lock().ok().and_then(|s| s.clone())
    }

    fn render_chat(&self, prompt: &ChatPrompt) -> Result<String, BackendError> {
        let t = self.template.as_ref().ok_or_else(|| {
            invalid("this model has no chat template; use /v1/completions with a raw prompt, or start the server with --chat-template")
        })?;
        let mut extra = serde_json::Map::new();
        if let Some(on) = prompt.enable_thinking {
            extra.insert("enable_thinking".into(), on.into());
        }
        let opts = RenderOptions {
            // An empty list rather than none: minijinja counts `none` as
            // iterable, so Qwen3-Coder's `tools is iterable and tools |
            // length > 0` fails on none; `[]` is falsy wherever none is.
            tools: Some(prompt.tools.clone()),
            add_generation_prompt: true,
            extra,
        };
        t.render(&prompt.messages, &opts).map_err(invalid)
    }

    fn template_source(&self) -> Option<&str> {
        self.template.as_ref().map(ChatTemplate::source)
    }

    fn compile_grammar(&self, lark: &str, prefix: &str) -> Result<Option<Grammar>, ConstrainError> {
        let env = self
            .grammar_env
            .get_or_init(|| {
                GrammarEnv::new(self.tokenizer.inner(), &self.eos_ids, self.vocab)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ConstrainError::Tokenizer(e.clone()))?;
        env.compile(lark, prefix).map(Some)
    }

    fn special_tokens(&self) -> &[String] {
        &self.special
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        // The template (or the raw-completion caller) wrote any special
        // tokens already; add none.
        self.tokenizer.encode(text, false).map_err(invalid)
    }

    fn generate(
        &self,
        prompt: &[u32],
        params: &GenParams,
        on_delta: &mut dyn FnMut(Delta<'_>) -> bool,
    ) -> Result<Completion, BackendError> {
        let mut gen = match self.gen.lock() {
            Ok(g) => g,
            // An earlier generation panicked mid-step: its KV state is
            // suspect, so start this one from scratch.
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                g.reset();
                self.gen.clear_poison();
                g
            }
        };
        let pen = &params.penalties;
        let sampling = SamplingParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed: params.seed,
            presence_penalty: pen.presence_penalty.unwrap_or(0.0),
            frequency_penalty: pen.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: pen
                .repetition_penalty
                .unwrap_or(self.sampling.repetition_penalty),
            min_p: pen.min_p.unwrap_or(self.sampling.min_p),
            logit_bias: pen.logit_bias.clone(),
            ..self.sampling.clone()
        };
        let opts = GenerateOptions {
            max_tokens: params.max_tokens,
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
            // Qwen's `<tool_call>` is an added but not special token, so it
            // survives; `<|im_start|>` and friends do not leak into replies.
            // Formats whose markers are special tokens keep them all.
            skip_special_tokens: !self.keep_special,
            logprobs: params.logprobs,
        };
        // A token as its text, special tokens spelled out (what the model
        // wrote, also where the reply drops them).
        let piece = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let mut on_event = |e: Event| {
            let (text, logprob) = match e {
                Event::Token { id, text, logprob } => (
                    text,
                    logprob.map(|lp| Logprob {
                        token: piece(id),
                        logprob: lp.logprob,
                        top: lp.top.into_iter().map(|(t, l)| (piece(t), l)).collect(),
                    }),
                ),
                Event::Text { text } => (text, None),
                Event::PromptProcessed { .. } => (String::new(), None),
            };
            let go = logprob.is_none_or(|lp| on_delta(Delta::Logprob(lp)))
                && (text.is_empty() || on_delta(Delta::Text(&text)));
            if go {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        };
        let mut mask = params.grammar.as_ref().map(Grammar::mask);
        let constraint = mask
            .as_mut()
            .map(|m| m as &mut dyn crate::generate::TokenConstraint);
        let c = gen.generate_constrained(prompt, &sampling, &opts, constraint, &mut on_event);
        if let Some(m) = &mask {
            let (time, steps) = m.cost();
            // One line per constrained request: what the grammar cost.
            tracing::info!(
                target: "mfx::grammar",
                steps,
                mask_us_per_token = format!("{:.1}", time.as_secs_f64() * 1e6 / steps.max(1) as f64),
                "grammar mask cost"
            );
        }
        self.remember_stats(gen.cache_stats());
        if let Ok(mut last) = self.last_slots.lock() {
            *last = slot_stats(&gen);
        }
        let c = c.map_err(|e| match e {
            GenerateError::PromptTooLong { .. }
            | GenerateError::EmptyPrompt
            | GenerateError::Sampling(_) => invalid(e),
            other => BackendError::Internal(other.to_string()),
        })?;
        Ok(Completion {
            finish: match c.finish_reason {
                FinishReason::Eos(_) => Finish::Eos,
                FinishReason::StopString(s) => Finish::Stop(s),
                FinishReason::Length => Finish::Length,
                FinishReason::Cancelled => Finish::Cancelled,
            },
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            cached_prompt_tokens: c.reused_prompt_tokens,
            time_to_first_token: c.timings.time_to_first_token,
            total_time: c.timings.prompt + c.timings.decode,
        })
    }
}
