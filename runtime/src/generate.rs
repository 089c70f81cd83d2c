//! The generation loop: prompt ids in, streamed text out.
//!
//! [`Generator`] owns one model (and its KV state), the tokenizer, the chat
//! template and the model's generation defaults. It is `Send`, so a server can
//! keep it on a worker thread and feed it requests one at a time; the
//! per-token [`Event`] callback is where streaming and cancellation happen.
//!
//! What it takes care of, so callers don't have to:
//! * **Prompt-prefix reuse that never changes the output.** It remembers the
//!   ids in the model's KV state; a new prompt that starts with them (a
//!   chat's next turn, a retried request) only prefills the new suffix.
//!   `Completion::reused_prompt_tokens` says how many were skipped.
//! * **Chunked prefill**, so a long prompt never materializes activations for
//!   thousands of positions at once. Chunks sit on a fixed grid of
//!   positions (`[0, c)`, `[c, 2c)`, ... then the tail), and only whole grid
//!   chunks are reused: a kernel's result for a position depends on the
//!   batch it was computed in (the int8 products accumulate differently for
//!   1-4 rows than for more; an expert sees a different set of tokens), so
//!   KV state computed in another split (the previous prompt's tail, the
//!   tokens it decoded one at a time) would make greedy output depend on
//!   what ran before. With the grid, a prompt's logits are bit-identical
//!   whatever ran before; the price is re-prefilling up to `c - 1` tokens
//!   plus the previous reply on a chat's next turn.
//! * **Text that is safe to show**: deltas never split a UTF-8 character, and
//!   text that might be the beginning of a stop string is held back until it
//!   is known not to be; the stop string itself is never emitted.
//! * **Stop conditions**: EOS ids (generation_config.json's `eos_token_id`,
//!   int or list, plus the model config's and the tokenizer's EOS), stop
//!   strings, `max_tokens`, the context limit, cancellation.

use crate::chat::{ChatTemplate, ChatTemplateError, RenderOptions};
use crate::error::RuntimeError;
use crate::models::{Checkpoint, LoadOptions, Model, ModelInfo};
use crate::prompt_cache::{PromptCache, Slot, SlotOptions, SlotStats};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::speculate::{DraftStats, Drafter, SpecOptions};
use crate::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use serde_json::Value as Json;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

/// Prompt positions per `forward` call during prefill: large enough to keep
/// the matmuls efficient, small enough to bound activation memory.
pub use crate::load::DEFAULT_PREFILL_CHUNK;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Pack(#[from] mfx_formats::FormatError),
    #[error("{origin}: {msg}")]
    GenerationConfig { origin: String, msg: String },
    #[error("the model has no chat template (no chat_template.jinja and no `chat_template` in tokenizer_config.json)")]
    NoChatTemplate,
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("prompt is {prompt} tokens but the model's context is {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the model returned {got} logits, expected its vocabulary size {expected}")]
    LogitsSize { got: usize, expected: usize },
    #[error("constrained decoding: {0}")]
    Constraint(String),
    #[error("speculative decoding could not take its draft back to position {0} (the model refused to truncate)")]
    Draft(usize),
}

/// One verify pass in flight: its draft length, the draft tokens that
/// matched so far, and its forward's time.
struct Pass {
    drafted: usize,
    accepted: usize,
    time: Duration,
}

/// Restricts which tokens may come next (a grammar: `constrain::TokenMask`).
pub trait TokenConstraint {
    /// Sets the logits of the tokens not allowed next to -inf; called once
    /// per step, before sampling.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Advances past the sampled token (not called for end-of-sequence).
    fn commit(&mut self, id: u32) -> Result<(), String>;
}

/// The generation defaults of `generation_config.json` that matter here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` of a model directory; the default
    /// (empty) config if the file is absent.
    pub fn from_model_dir(dir: &Path) -> Result<Self, GenerateError> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json_str(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(GenerateError::GenerationConfig {
                origin: path.display().to_string(),
                msg: e.to_string(),
            }),
        }
    }

    /// Parses the JSON text; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, GenerateError> {
        let v: Json = serde_json::from_str(text).map_err(|e| GenerateError::GenerationConfig {
            origin: origin.into(),
            msg: format!("invalid JSON: {e}"),
        })?;
        Self::from_json(&v, origin)
    }

    /// From a parsed object (a pack's embedded `generation`).
    pub fn from_json(v: &Json, origin: &str) -> Result<Self, GenerateError> {
        let bad = |key: &str, expected: &str| GenerateError::GenerationConfig {
            origin: origin.into(),
            msg: format!(
                "key `{key}`: expected {expected}, found {}",
                v.get(key).map_or("nothing".into(), |x| x.to_string())
            ),
        };
        let obj = v
            .as_object()
            .ok_or_else(|| GenerateError::GenerationConfig {
                origin: origin.into(),
                msg: "expected a JSON object".into(),
            })?;
        let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
        let as_id = |x: &Json| x.as_u64().and_then(|n| u32::try_from(n).ok());
        let eos_token_ids = match get("eos_token_id") {
            None => Vec::new(),
            Some(x) if x.is_u64() => {
                vec![as_id(x).ok_or_else(|| bad("eos_token_id", "a token id"))?]
            }
            Some(Json::Array(a)) => a
                .iter()
                .map(|x| as_id(x).ok_or_else(|| bad("eos_token_id", "a list of token ids")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("eos_token_id", "a token id or a list of them")),
        };
        let f = |k: &str| -> Result<Option<f32>, GenerateError> {
            match get(k) {
                None => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|n| Some(n as f32))
                    .ok_or_else(|| bad(k, "a number")),
            }
        };
        let top_k = match get("top_k") {
            None => None,
            Some(x) => Some(
                x.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad("top_k", "a non-negative integer"))?,
            ),
        };
        let do_sample = match get("do_sample") {
            None => None,
            Some(x) => Some(
                x.as_bool()
                    .ok_or_else(|| bad("do_sample", "true or false"))?,
            ),
        };
        Ok(Self {
            eos_token_ids,
            do_sample,
            temperature: f("temperature")?,
            top_p: f("top_p")?,
            top_k,
            min_p: f("min_p")?,
            repetition_penalty: f("repetition_penalty")?,
        })
    }

    /// The sampling parameters this config asks for, with transformers'
    /// semantics: without `do_sample: true` decoding is greedy, whatever the
    /// temperature says.
    pub fn sampling_defaults(&self) -> SamplingParams {
        let mut p = SamplingParams::default();
        if let Some(r) = self.repetition_penalty {
            p.repetition_penalty = r;
        }
        if self.do_sample == Some(true) {
            p.temperature = self.temperature.unwrap_or(1.0);
            p.top_p = self.top_p.unwrap_or(1.0);
            p.top_k = self.top_k.unwrap_or(50);
            p.min_p = self.min_p.unwrap_or(0.0);
        }
        p
    }
}

/// Limits and stop conditions of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (also capped by the context).
    pub max_tokens: usize,
    /// Stop strings: generation ends when the text contains one; it and
    /// everything after it are dropped from the output.
    pub stop: Vec<String>,
    /// Keep going past EOS tokens (benchmarks, reference comparisons).
    pub ignore_eos: bool,
    /// Drop special tokens (e.g. `<|im_start|>`) from the text. Stop tokens
    /// are never part of the text either way.
    pub skip_special_tokens: bool,
    /// Report each sampled token's log-probability and this many of the
    /// most likely alternatives (`Event::Token`'s `logprob`); `None` skips
    /// the work.
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: false,
            logprobs: None,
        }
    }
}

/// What the callback sees, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Prefill finished (sent once, before the first token).
    PromptProcessed {
        prompt_tokens: usize,
        reused_tokens: usize,
        elapsed: Duration,
    },
    /// A token was sampled. `text` is the newly releasable text; it may be
    /// empty (an incomplete character or a possible stop-string start is
    /// being held back) and held text arrives with later tokens. `logprob`
    /// is set when [`GenerateOptions::logprobs`] asks for it.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Held-back text released when the stream ends (no new token): the
    /// tail of a partial stop-string match, or a final partial character.
    Text { text: String },
}

/// A sampled token's log-probability under the model's distribution: the
/// log-softmax of the raw logits, before `logit_bias`, penalties,
/// temperature and truncation (vLLM's default, `raw_logprobs`), so it is
/// what scoring the same text with the model gives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely
    /// first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax facts of one logits row: its log-sum-exp and top ids.
struct LogitsSummary {
    lse: f32,
    top: Vec<(u32, f32)>,
}

impl LogitsSummary {
    fn of(logits: &[f32], k: usize) -> Self {
        let finite = || logits.iter().copied().filter(|v| v.is_finite());
        let max = finite().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = finite().map(|v| ((v - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        // k is small (OpenAI allows 20): a sorted list of the best k.
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k > 0 {
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_finite() || (top.len() == k && v <= top[k - 1].1) {
                    continue;
                }
                let at = top.partition_point(|&(_, t)| t >= v);
                top.insert(at, (i as u32, v));
                top.truncate(k);
            }
        }
        for e in &mut top {
            e.1 -= lse;
        }
        Self { lse, top }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted this end-of-sequence id.
    Eos(u32),
    /// The text contained this stop string.
    StopString(String),
    /// `max_tokens` or the model's context ran out.
    Length,
    /// The callback returned `ControlFlow::Break`.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's `finish_reason` vocabulary.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Eos(_) | FinishReason::StopString(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Wall-clock time spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Prefill of the non-reused prompt tokens (ends with the first logits).
    pub prompt: Duration,
    /// Everything after prefill: sampling and the decode forwards.
    pub decode: Duration,
    /// From the call to the first sampled token.
    pub time_to_first_token: Duration,
    /// What speculative drafting did (all zero when it is off).
    pub draft: DraftStats,
}

/// The result of [`Generator::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated ids, excluding a final EOS id.
    pub token_ids: Vec<u32>,
    /// The generated text (what the events released, concatenated).
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV state was kept from the previous call.
    pub reused_prompt_tokens: usize,
    /// Sampled tokens, including a final EOS (what an API bills).
    pub completion_tokens: usize,
    pub timings: Timings,
}

impl Completion {
    /// Prefill throughput over the tokens actually processed.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        let n = self.prompt_tokens - self.reused_prompt_tokens;
        rate(n, self.timings.prompt)
    }

    /// Decode throughput: the first token comes out of prefill, so `n`
    /// tokens cost `n - 1` decode forwards.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(
            self.completion_tokens.saturating_sub(1),
            self.timings.decode,
        )
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// A model with everything needed to turn prompts into text.
pub struct Generator {
    model: Box<dyn Model>,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    config: GenerationConfig,
    eos_ids: Vec<u32>,
    /// The ids whose KV state the model holds, in order.
    fed: Vec<u32>,
    /// How many of `fed` were computed as whole prefill chunks on the grid
    /// (`[0, prefill_chunk)`, `[prefill_chunk, 2 * prefill_chunk)`, ...):
    /// the only state a later prompt may reuse (see the module docs).
    on_grid: usize,
    /// Reuse only state on the grid (the default); off, any common prefix.
    exact_reuse: bool,
    prefill_chunk: usize,
    /// Prompt-lookup drafting (off unless [`Generator::set_speculation`]).
    spec: SpecOptions,
    /// Other sessions' state (issue 19); none unless [`Generator::set_slots`].
    slots: PromptCache,
    /// Checkpoints of the live state's recurrent layers, oldest first
    /// (empty for models whose state truncates).
    checkpoints: Vec<Checkpoint>,
    /// The model's identity in spill files ([`model_identity`]).
    identity: u64,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("model", self.model.info())
            .field("eos_ids", &self.eos_ids)
            .field("cached_tokens", &self.fed.len())
            .finish()
    }
}

impl Generator {
    /// Assembles a generator. EOS ids are the union of the generation
    /// config's, the model config's and the chat template's `eos_token`.
    pub fn new(
        model: Box<dyn Model>,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        config: GenerationConfig,
    ) -> Self {
        let mut eos_ids = config.eos_token_ids.clone();
        eos_ids.extend(model.info().eos_token_ids.iter().copied());
        if let Some(id) = chat_template
            .as_ref()
            .and_then(|t| t.eos_token())
            .and_then(|s| tokenizer.piece_to_id(s))
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let mut model = model;
        model.reset();
        Self {
            model,
            tokenizer,
            chat_template,
            config,
            eos_ids,
            fed: Vec::new(),
            on_grid: 0,
            exact_reuse: true,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            spec: SpecOptions::OFF,
            slots: PromptCache::new(SlotOptions::default(), 0, DEFAULT_PREFILL_CHUNK),
            checkpoints: Vec::new(),
            identity: 0,
        }
    }

    /// Loads everything from a Hugging Face / MLX model directory.
    pub fn from_model_dir(dir: &Path, opts: &LoadOptions) -> Result<Self, GenerateError> {
        Self::load(dir, opts)
    }

    /// Loads a model directory (or its `config.json`) or a `.mfx` pack,
    /// whose manifest embeds the tokenizer, chat template and generation
    /// defaults. MODEL is resolved (and a pack opened) once, by
    /// [`crate::load::resolve`].
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, GenerateError> {
        let resolved = crate::load::resolve(path)?;
        let (tokenizer, chat_template, config) = match resolved.pack() {
            Some(pack) => {
                let origin = resolved.path.display().to_string();
                let m = pack.manifest();
                let tokenizer = Tokenizer::from_bytes(m.tokenizer_json.as_bytes())?;
                let chat_template = match &m.chat_template {
                    Some(src) => Some(ChatTemplate::new(
                        src.clone(),
                        format!("{origin} (chat_template)"),
                        None,
                        None,
                    )?),
                    None => None,
                };
                let config = if m.generation.is_null() {
                    GenerationConfig::default()
                } else {
                    GenerationConfig::from_json(&m.generation, &format!("{origin} (generation)"))?
                };
                (tokenizer, chat_template, config)
            }
            None => {
                let dir = &resolved.path;
                (
                    Tokenizer::from_model_dir(dir)?,
                    ChatTemplate::from_model_dir(dir)?,
                    GenerationConfig::from_model_dir(dir)?,
                )
            }
        };
        let identity = model_identity(&resolved, opts);
        let model = resolved.load(opts)?;
        let mut g = Self::new(model, tokenizer, chat_template, config);
        g.identity = identity;
        if let Some(n) = opts.prefill_chunk {
            g.set_prefill_chunk(n);
        }
        Ok(g)
    }

    /// Loads a `.mfx` pack.
    pub fn from_pack(path: &Path, opts: &LoadOptions) -> Result<Self, GenerateError> {
        Self::load(path, opts)
    }

    /// The expert cache's counters, when the model streams its experts
    /// from a pack (`None` for checkpoint directories).
    pub fn cache_stats(&self) -> Option<crate::cache::StatsSnapshot> {
        self.model.expert_cache().map(|c| c.stats())
    }

    /// The expert cache itself (capacities, policy, resident bytes).
    pub fn expert_cache(&self) -> Option<std::sync::Arc<crate::cache::ExpertCache>> {
        self.model.expert_cache()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.config
    }

    pub fn model_info(&self) -> &ModelInfo {
        self.model.info()
    }

    /// The ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The model's recommended sampling (see [`GenerationConfig::sampling_defaults`]).
    pub fn default_sampling(&self) -> SamplingParams {
        self.config.sampling_defaults()
    }

    /// Tokens the model's KV state currently holds.
    pub fn cached_tokens(&self) -> usize {
        self.fed.len()
    }

    /// Changes the prefill chunk (minimum 1), and with it the grid of
    /// reusable positions: no state computed on the old grid is reused.
    pub fn set_prefill_chunk(&mut self, n: usize) {
        if n.max(1) != self.prefill_chunk {
            self.on_grid = 0;
            self.checkpoints.clear();
        }
        self.prefill_chunk = n.max(1);
        self.slots.set_grid(self.prefill_chunk);
    }

    /// Keeps other sessions' state in prompt-cache slots (and spills them to
    /// `opts.dir`), replacing any slots held; see [`crate::prompt_cache`].
    /// Under a streaming expert cache the RAM limit is also the slot bytes
    /// the budget granted, lowered by the memory-pressure governor.
    /// Speculative decoding by prompt lookup (see [`crate::speculate`]):
    /// the same tokens, sooner where the model repeats its context. Models
    /// that cannot verify a draft in one exact pass
    /// ([`Model::batched_steps`]: hybrid recurrent state, sparse attention)
    /// decode without it.
    pub fn set_speculation(&mut self, opts: SpecOptions) {
        self.spec = opts;
    }

    /// Whether drafting runs for this model (set, and the model can verify).
    pub fn speculation_active(&self) -> bool {
        self.spec.enabled() && self.model.batched_steps()
    }

    pub fn set_slots(&mut self, opts: SlotOptions) {
        self.slots = PromptCache::new(opts, self.identity, self.prefill_chunk);
        if let Some(c) = self.model.expert_cache() {
            self.slots.share_limit(c.slot_ram_limit());
        }
    }

    /// Sets the identity spill files are written and accepted under
    /// (loading computes it; a generator built from parts has 0).
    pub fn set_model_identity(&mut self, identity: u64) {
        if identity != self.identity {
            self.identity = identity;
            self.set_slots(self.slots.options().clone());
        }
    }

    /// The identity spill files are written and accepted under.
    pub fn model_identity(&self) -> u64 {
        self.identity
    }

    /// Whether other sessions are kept ([`Generator::set_slots`]).
    pub fn slots_enabled(&self) -> bool {
        self.slots.enabled()
    }

    /// The prompt cache's counters.
    pub fn slot_stats(&self) -> SlotStats {
        self.slots.stats()
    }

    /// A handle the memory-pressure governor lowers the slots' RAM through.
    pub fn slot_pressure_limit(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.slots.pressure_limit()
    }

    /// Moves the live state into a slot and spills every slot to the slot
    /// directory (kept for the next process); a no-op without one.
    pub fn persist_slots(&mut self) {
        if self.slots.options().dir.is_some() {
            self.stash_live();
            self.slots.spill_all();
        }
    }

    /// Whether a prompt's logits must be bit-identical whatever ran before
    /// (the default: only whole prefill chunks on the grid are reused; see
    /// the module docs). Off, the whole common prefix is reused, which an
    /// interactive chat, whose turns extend one another, prefers.
    pub fn set_exact_prefix_reuse(&mut self, on: bool) {
        self.exact_reuse = on;
    }

    /// Drops the live KV state (slots are kept).
    pub fn reset(&mut self) {
        self.model.reset();
        self.fed.clear();
        self.on_grid = 0;
        self.checkpoints.clear();
    }

    /// Tokenizes raw prompt text (the tokenizer's post-processor decides
    /// about BOS, as `tokenizer(text)` does in transformers).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        Ok(self.tokenizer.encode(text, true)?)
    }

    /// Renders messages with the model's chat template and tokenizes the
    /// result (no extra special tokens: the template has them).
    pub fn encode_chat(
        &self,
        messages: &[Json],
        opts: &RenderOptions,
    ) -> Result<Vec<u32>, GenerateError> {
        let text = self.render_chat(messages, opts)?;
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// Renders messages with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[Json],
        opts: &RenderOptions,
    ) -> Result<String, GenerateError> {
        let t = self
            .chat_template
            .as_ref()
            .ok_or(GenerateError::NoChatTemplate)?;
        Ok(t.render(messages, opts)?)
    }

    /// Generates a continuation of `prompt_ids`, calling `on_event` as it
    /// goes; return `ControlFlow::Break(())` from it to stop early.
    ///
    /// The KV state is left holding the prompt and the generated tokens, so
    /// a follow-up prompt that extends them is prefilled incrementally.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        opts: &GenerateOptions,
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        self.generate_constrained(prompt_ids, params, opts, None, on_event)
    }

    /// [`generate`](Self::generate), with each token drawn only from those
    /// `constraint` allows (masked after the log-probabilities are taken,
    /// before the sampler's filters, so greedy and seeded sampling keep
    /// their meaning over the allowed tokens).
    pub fn generate_constrained(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        opts: &GenerateOptions,
        mut constraint: Option<&mut dyn TokenConstraint>,
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        let start = Instant::now();
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let info = self.model.info();
        let vocab = info.vocab_size;
        let context = info.max_context;
        if prompt_ids.len() > context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt_ids.len(),
                context,
            });
        }
        if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::TokenOutOfRange { id, vocab }.into());
        }
        let mut sampler = Sampler::new(params.clone())?;

        // Prefill, reusing the longest common prefix still in the KV state
        // (at least the last prompt token is re-fed: we need its logits).
        let reused = self.reuse_prefix(prompt_ids);
        let mut logits = Vec::new();
        // `reused` is on the grid, so these chunks are the grid's.
        for chunk in prompt_ids[reused..].chunks(self.prefill_chunk) {
            logits = self.forward(chunk)?;
            if chunk.len() == self.prefill_chunk && self.on_grid + chunk.len() == self.fed.len() {
                self.on_grid = self.fed.len();
                self.maybe_checkpoint(prompt_ids.len());
            }
        }
        let prompt_time = start.elapsed();
        let mut completion = Completion {
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: prompt_ids.len(),
            reused_prompt_tokens: reused,
            completion_tokens: 0,
            timings: Timings {
                prompt: prompt_time,
                ..Timings::default()
            },
        };
        let decode_start = Instant::now();
        let finish = |c: &mut Completion| {
            c.timings.decode = decode_start.elapsed();
            if c.timings.time_to_first_token.is_zero() {
                c.timings.time_to_first_token = start.elapsed();
            }
        };
        let event = Event::PromptProcessed {
            prompt_tokens: prompt_ids.len(),
            reused_tokens: reused,
            elapsed: prompt_time,
        };
        if on_event(event).is_break() {
            completion.finish_reason = FinishReason::Cancelled;
            finish(&mut completion);
            return Ok(completion);
        }

        let budget = opts.max_tokens.min(context - prompt_ids.len());
        let mut history: Vec<u32> = prompt_ids.to_vec();
        // Speculation: rows of the last verify pass not yet consumed, each
        // with the draft token it was computed after; the pass's counts.
        let mut drafter = self.speculation_active().then(|| Drafter::new(self.spec));
        let mut pending: VecDeque<(u32, Vec<f32>)> = VecDeque::new();
        let mut pass: Option<Pass> = None;
        let mut decoder = StreamDecoder::new(opts.skip_special_tokens);
        let mut stops = StopMatcher::new(&opts.stop);
        while completion.completion_tokens < budget {
            // Before the sampler rewrites the logits in place.
            let summary = opts.logprobs.map(|k| LogitsSummary::of(&logits, k));
            let raw = summary.as_ref().map(|_| logits.clone());
            if let Some(c) = constraint.as_deref_mut() {
                c.mask(&mut logits).map_err(GenerateError::Constraint)?;
            }
            let id = sampler.sample(&mut logits, &history)?;
            let logprob = summary.zip(raw).map(|(s, raw)| TokenLogprob {
                logprob: raw[id as usize] - s.lse,
                top: s.top,
            });
            completion.completion_tokens += 1;
            if completion.completion_tokens == 1 {
                completion.timings.time_to_first_token = start.elapsed();
            }
            if !opts.ignore_eos && self.eos_ids.contains(&id) {
                completion.finish_reason = FinishReason::Eos(id);
                break;
            }
            if let Some(c) = constraint.as_deref_mut() {
                c.commit(id).map_err(GenerateError::Constraint)?;
            }
            completion.token_ids.push(id);
            history.push(id);
            let piece = decoder.step(&self.tokenizer, id)?;
            let (text, matched) = stops.push(&piece);
            completion.text.push_str(&text);
            let flow = on_event(Event::Token { id, text, logprob });
            if let Some(s) = matched {
                completion.finish_reason = FinishReason::StopString(s);
                break;
            }
            if flow.is_break() {
                completion.finish_reason = FinishReason::Cancelled;
                break;
            }
            if completion.completion_tokens == budget {
                break;
            }
            let Some(d) = drafter.as_mut() else {
                logits = self.forward(&[id])?;
                continue;
            };
            if pending.is_empty() && pass.is_none() {
                d.observe(id);
            }
            // A row the verify pass already computed after this very token.
            if let Some((tok, row)) = pending.pop_front() {
                if tok == id {
                    if let Some(p) = pass.as_mut() {
                        p.accepted += 1;
                    }
                    logits = row;
                    continue;
                }
                // A miss: the drafted positions from this one on go.
                let keep = self.fed.len() - pending.len() - 1;
                pending.clear();
                if self.rewind(keep) != keep {
                    return Err(GenerateError::Draft(keep));
                }
            }
            if let Some(p) = pass.take() {
                d.verified(p.drafted, p.accepted, p.time);
            }
            let room = (budget - completion.completion_tokens - 1)
                .min(context.saturating_sub(self.fed.len() + 1));
            let draft = d.draft(&history, room);
            let t = Instant::now();
            if draft.is_empty() {
                logits = self.forward(&[id])?;
                d.plain_step(t.elapsed());
                continue;
            }
            let mut feed = Vec::with_capacity(draft.len() + 1);
            feed.push(id);
            feed.extend_from_slice(&draft);
            let rows = self.forward_steps(&feed)?;
            let mut rows = rows.chunks_exact(vocab).map(<[f32]>::to_vec);
            logits = rows.next().unwrap_or_default();
            pending.extend(draft.iter().copied().zip(rows));
            pass = Some(Pass {
                drafted: draft.len(),
                accepted: 0,
                time: t.elapsed(),
            });
        }
        // Drafted positions past the last sampled token leave the state, so
        // it holds what it would without drafting.
        if !pending.is_empty() {
            let keep = self.fed.len() - pending.len();
            if self.rewind(keep) != keep {
                return Err(GenerateError::Draft(keep));
            }
        }
        if let Some(d) = drafter.as_mut() {
            if let Some(p) = pass.take() {
                d.verified(p.drafted, p.accepted, p.time);
            }
            completion.timings.draft = d.stats;
        }
        // Release what was held back (a partial character, or text that
        // could have begun a stop string but the stream ended first).
        if completion.finish_reason == FinishReason::Length
            || matches!(completion.finish_reason, FinishReason::Eos(_))
        {
            let tail = decoder.finish(&self.tokenizer)?;
            let (mut text, matched) = stops.push(&tail);
            if let Some(s) = matched {
                completion.finish_reason = FinishReason::StopString(s);
            } else {
                text.push_str(&stops.flush());
            }
            if !text.is_empty() {
                completion.text.push_str(&text);
                // Streaming consumers must see the same text as `Completion::text`.
                let _ = on_event(Event::Text { text });
            }
        }
        finish(&mut completion);
        Ok(completion)
    }

    /// Makes the model hold the longest reusable prefix of `prompt` (the
    /// live state's, or a slot's, which then becomes the live state) and
    /// returns its length: a prefix shared with `prompt` that ends on the
    /// prefill grid within the state computed on it, at a position the state
    /// can go back to (anything for KV caches, a checkpoint for recurrent
    /// state), leaving at least one prompt token to feed.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        if self.model.seq_len() != self.fed.len() {
            // Someone drove the model behind our back: trust nothing.
            self.reset();
        }
        // Memory pressure may have lowered the slots' limit since.
        self.slots.enforce();
        let limit = prompt.len() - 1;
        let live = self.live_reach(prompt, limit);
        if self.slots.enabled() && self.model.state().is_some() {
            let best = self.slots.best(prompt, limit, self.exact_reuse);
            // A refused spill file is counted and logged by the cache; the
            // prompt is then prefilled from what is live.
            let slot = match best {
                Some((src, n)) if n > live => self.slots.take(src, self.model.as_ref()).ok(),
                _ => None,
            };
            match slot {
                Some(slot) => {
                    self.stash_live();
                    self.install(slot);
                }
                // Another session (it shares less than half the live
                // state: a system prompt, not an edited history): the live
                // one goes to a slot whole, and the prompt continues from a
                // copy of the shared prefix. An edit of the live session
                // just truncates it.
                None if live < self.reachable(self.stash_end()) / 2 => self.fork_live(live),
                None => {}
            }
        }
        let keep = self.live_reach(prompt, limit);
        let keep = self.rewind(keep);
        self.slots.note_reuse(keep);
        keep
    }

    /// The longest prefix of `prompt` (at most `limit`) the live state can
    /// give back.
    fn live_reach(&self, prompt: &[u32], limit: usize) -> usize {
        let common = self
            .fed
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let mut keep = common.min(limit);
        if self.exact_reuse {
            keep = keep.min(self.on_grid);
            keep -= keep % self.prefill_chunk;
        }
        self.reachable(keep)
    }

    /// The longest length at most `keep` the live state can go back to.
    fn reachable(&self, keep: usize) -> usize {
        match self.model.state() {
            Some(st) if keep < self.fed.len() && st.needs_checkpoints() => self
                .checkpoints
                .iter()
                .map(|c| c.len)
                .filter(|&l| l <= keep)
                .max()
                .unwrap_or(0),
            _ => keep,
        }
    }

    /// Brings the live state back to `keep` positions (truncation, or the
    /// checkpoint there); returns the length kept (0 after a reset when it
    /// cannot).
    fn rewind(&mut self, keep: usize) -> usize {
        if keep >= self.fed.len() {
            return self.fed.len();
        }
        let ok = keep > 0 && {
            let cp = self.checkpoints.iter().find(|c| c.len == keep);
            let needs = self.model.state().is_some_and(|s| s.needs_checkpoints());
            match cp {
                Some(cp) if needs => self.model.state_mut().is_some_and(|st| st.rollback(cp)),
                _ => self.model.truncate(keep),
            }
        };
        if !ok {
            self.reset();
            return 0;
        }
        self.fed.truncate(keep);
        self.on_grid = self.on_grid.min(keep - keep % self.prefill_chunk);
        self.checkpoints.retain(|c| c.len <= keep);
        keep
    }

    /// Where the live state's reusable part ends.
    fn stash_end(&self) -> usize {
        if self.exact_reuse {
            self.on_grid.min(self.fed.len())
        } else {
            self.fed.len()
        }
    }

    /// Stashes the live session in a slot and makes a copy of its first
    /// `keep` positions the live state (nothing, if no copy can be made).
    fn fork_live(&mut self, keep: usize) {
        let cp = self.checkpoints.iter().find(|c| c.len == keep);
        let copy = (keep > 0)
            .then(|| self.model.state().and_then(|s| s.prefix_copy(keep, cp)))
            .flatten();
        let tokens = self.fed[..keep.min(self.fed.len())].to_vec();
        let checkpoints: Vec<Checkpoint> = self
            .checkpoints
            .iter()
            .filter(|c| c.len <= keep)
            .cloned()
            .collect();
        let on_grid = self.on_grid.min(keep - keep % self.prefill_chunk);
        self.stash_live();
        if let Some(state) = copy {
            self.install(Slot::new(tokens, on_grid, state, checkpoints));
        }
    }

    /// Moves the reusable part of the live state into a slot (the rest is
    /// dropped) and leaves the model empty.
    fn stash_live(&mut self) {
        let keep = self.reachable(self.stash_end());
        if keep > 0 && self.rewind(keep) == keep {
            if let Some(state) = self.model.take_state() {
                let slot = Slot::new(
                    std::mem::take(&mut self.fed),
                    self.on_grid,
                    state,
                    std::mem::take(&mut self.checkpoints),
                );
                self.slots.insert(slot);
            }
        }
        self.reset();
    }

    /// Makes `slot` the live state.
    fn install(&mut self, slot: Slot) {
        if self.model.put_state(slot.state).is_err() {
            self.reset();
            return;
        }
        self.fed = slot.tokens;
        self.on_grid = slot.on_grid;
        self.checkpoints = slot.checkpoints;
    }

    /// After a grid chunk ending at `on_grid`: checkpoints recurrent state
    /// every `checkpoint_every` chunks and at the last whole chunk of the
    /// prompt (where a chat's next turn, or a re-rendered last message,
    /// resumes).
    fn maybe_checkpoint(&mut self, prompt_len: usize) {
        let o = self.slots.options();
        let (every, max) = (o.checkpoint_every.max(1), o.max_checkpoints);
        let Some(st) = self.model.state() else {
            return;
        };
        if max == 0 || !st.needs_checkpoints() {
            return;
        }
        let last = prompt_len - self.on_grid < self.prefill_chunk;
        if (self.on_grid / self.prefill_chunk).is_multiple_of(every) || last {
            self.checkpoints.push(st.checkpoint());
            if self.checkpoints.len() > max {
                self.checkpoints.remove(0);
            }
        }
    }

    /// One forward call (the last position's logits) that keeps `fed` in
    /// step with the model.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        self.feed(tokens, false)
    }

    /// [`Model::forward_steps`] (every position's logits, each as a
    /// one-token step computes it), keeping `fed` in step.
    fn forward_steps(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        self.feed(tokens, true)
    }

    fn feed(&mut self, tokens: &[u32], steps: bool) -> Result<Vec<f32>, GenerateError> {
        let out = if steps {
            self.model.forward_steps(tokens)
        } else {
            self.model.forward(tokens, false)
        };
        match out {
            Ok(logits) => {
                self.fed.extend_from_slice(tokens);
                let rows = if steps { tokens.len() } else { 1 };
                let expected = rows * self.model.info().vocab_size;
                if logits.len() != expected {
                    return Err(GenerateError::LogitsSize {
                        got: logits.len(),
                        expected,
                    });
                }
                Ok(logits)
            }
            Err(e) => {
                // The state may be half-updated; start clean next time.
                self.reset();
                Err(e.into())
            }
        }
    }
}

impl Drop for Generator {
    /// With a slot directory, the sessions outlive the process.
    fn drop(&mut self) {
        self.persist_slots();
    }
}

/// What spill files are tied to: the weights (a pack's manifest checksum,
/// which covers every blob's; a directory's config and its weight files'
/// names, sizes and times), the KV precision and the kernels (whose
/// rounding the state carries).
pub fn model_identity(resolved: &crate::load::Resolved, opts: &LoadOptions) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    match resolved.pack() {
        Some(p) => h.update(&p.header().manifest_checksum.to_le_bytes()),
        None => {
            let dir = if resolved.path.is_dir() {
                resolved.path.clone()
            } else {
                resolved
                    .path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            };
            if let Ok(b) = std::fs::read(dir.join("config.json")) {
                h.update(&b);
            }
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .collect();
            files.sort_by_key(|e| e.file_name());
            for e in files {
                h.update(e.file_name().to_string_lossy().as_bytes());
                if let Ok(m) = e.metadata() {
                    h.update(&m.len().to_le_bytes());
                    let t = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    h.update(&t.to_le_bytes());
                }
            }
        }
    }
    h.update(format!("{:?}", opts.kv_bits).as_bytes());
    h.update(crate::kernels::backend().name().as_bytes());
    h.digest()
}

/// Holds back text that could be the start of a stop string.
///
/// Matching is incremental (Knuth-Morris-Pratt, one automaton per stop
/// string): each new byte costs amortized O(1) per stop string, whatever the
/// length of the text so far or of the held-back tail, so hostile stop
/// strings cannot make a step slower than the bytes it adds. Only the tail
/// that may still begin a stop string is kept.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<Kmp>,
    /// Text not yet released: exactly the longest suffix of the stream that
    /// is a proper prefix of some stop string.
    pending: String,
}

/// One stop string's matcher: `state` is the length of the longest prefix
/// of `pat` that is a suffix of the bytes seen so far.
#[derive(Debug, Clone)]
struct Kmp {
    pat: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `pat[..=i]` that is
    /// also its suffix.
    fail: Vec<u32>,
    state: usize,
}

impl Kmp {
    fn new(pat: &str) -> Self {
        let pat = pat.as_bytes().to_vec();
        let mut fail = vec![0u32; pat.len()];
        let mut k = 0usize;
        for i in 1..pat.len() {
            while k > 0 && pat[i] != pat[k] {
                k = fail[k - 1] as usize;
            }
            if pat[i] == pat[k] {
                k += 1;
            }
            fail[i] = k as u32;
        }
        Self {
            pat,
            fail,
            state: 0,
        }
    }

    /// Feeds one byte; true when the whole pattern now ends here.
    fn step(&mut self, b: u8) -> bool {
        let mut k = self.state;
        if k == self.pat.len() {
            k = self.fail[k - 1] as usize;
        }
        while k > 0 && self.pat[k] != b {
            k = self.fail[k - 1] as usize;
        }
        if self.pat[k] == b {
            k += 1;
        }
        self.state = k;
        k == self.pat.len()
    }
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Kmp::new(s))
                .collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns what is safe to release and, if a stop string is
    /// now complete, which one (the text before it is released, the rest is
    /// dropped). The first stop string to complete wins; of several that
    /// complete at the same byte, the longest.
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        let bytes = text.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            // (index, length) of the stop string completed by this byte.
            let mut hit: Option<(usize, usize)> = None;
            for (j, k) in self.stops.iter_mut().enumerate() {
                if k.step(b) && hit.is_none_or(|(_, len)| len < k.pat.len()) {
                    hit = Some((j, k.pat.len()));
                }
            }
            if let Some((j, len)) = hit {
                // The stream (pending, then this piece up to here) ends with
                // the stop string; what precedes it is released. A stop
                // string begins with a character's first byte, so the cut is
                // on a character boundary.
                let end = self.pending.len() + i + 1 - len;
                let out = if end <= self.pending.len() {
                    self.pending[..end].to_owned()
                } else {
                    let mut out = std::mem::take(&mut self.pending);
                    out.push_str(&text[..end - out.len()]);
                    out
                };
                let matched = String::from_utf8_lossy(&self.stops[j].pat).into_owned();
                self.pending.clear();
                for k in &mut self.stops {
                    k.state = 0;
                }
                return (out, Some(matched));
            }
        }
        // Hold the longest tail that may still begin a stop string (it starts
        // with a stop string's first byte: a character boundary).
        let hold = self.stops.iter().map(|k| k.state).max().unwrap_or(0);
        let total = self.pending.len() + bytes.len();
        let cut = total - hold;
        if cut <= self.pending.len() {
            let out: String = self.pending.drain(..cut).collect();
            self.pending.push_str(text);
            (out, None)
        } else {
            let mut out = std::mem::take(&mut self.pending);
            let from_text = cut - out.len();
            out.push_str(&text[..from_text]);
            self.pending.push_str(&text[from_text..]);
            (out, None)
        }
    }

    /// Releases held-back text at the end of the stream.
    pub fn flush(&mut self) -> String {
        for k in &mut self.stops {
            k.state = 0;
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::message;
    use std::path::PathBuf;

    fn shared_model(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models")
            .join(name)
    }

    /// A scripted model: it "predicts" the next token of a fixed script,
    /// given how many tokens its state holds, and records every call.
    struct ScriptModel {
        info: ModelInfo,
        script: Vec<u32>,
        state: Vec<u32>,
        calls: std::sync::Arc<std::sync::Mutex<Vec<Vec<u32>>>>,
        can_truncate: bool,
    }

    impl ScriptModel {
        fn new(
            script: Vec<u32>,
            vocab: usize,
        ) -> (Self, std::sync::Arc<std::sync::Mutex<Vec<Vec<u32>>>>) {
            let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let info = ModelInfo {
                arch: "script".into(),
                vocab_size: vocab,
                hidden_size: 0,
                n_layers: 0,
                max_position_embeddings: 64,
                max_context: 64,
                bos_token_id: None,
                eos_token_ids: vec![2],
                num_experts: 0,
                num_experts_per_tok: 0,
            };
            (
                Self {
                    info,
                    script,
                    state: Vec::new(),
                    calls: calls.clone(),
                    can_truncate: true,
                },
                calls,
            )
        }
    }

    impl Model for ScriptModel {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn forward(&mut self, tokens: &[u32], _all: bool) -> Result<Vec<f32>, RuntimeError> {
            self.calls.lock().expect("lock").push(tokens.to_vec());
            self.state.extend_from_slice(tokens);
            let next = self.script.get(self.state.len()).copied().unwrap_or(0);
            let mut l = vec![0.0; self.info.vocab_size];
            l[next as usize] = 10.0;
            Ok(l)
        }
        fn seq_len(&self) -> usize {
            self.state.len()
        }
        fn truncate(&mut self, len: usize) -> bool {
            if self.can_truncate {
                self.state.truncate(len);
            }
            self.can_truncate
        }
        fn reset(&mut self) {
            self.state.clear();
        }
    }

    fn tiny_tokenizer() -> Tokenizer {
        Tokenizer::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("tokenizer")
    }

    /// A generator whose model "says" `text` after `prompt` (then EOS).
    /// Every token list the scripted model was fed, in call order.
    type Fed = std::sync::Arc<std::sync::Mutex<Vec<Vec<u32>>>>;

    fn scripted(prompt: &str, text: &str) -> (Generator, Vec<u32>, Fed) {
        let tok = tiny_tokenizer();
        let p = tok.encode(prompt, true).expect("encode");
        let mut script = p.clone();
        script.extend(tok.encode(text, false).expect("encode"));
        script.push(2);
        let (model, calls) = ScriptModel::new(script, tok.vocab_size());
        let tmpl = ChatTemplate::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("t");
        let cfg =
            GenerationConfig::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("cfg");
        (Generator::new(Box::new(model), tok, tmpl, cfg), p, calls)
    }

    fn collect(g: &mut Generator, p: &[u32], opts: &GenerateOptions) -> (Completion, Vec<Event>) {
        let mut events = Vec::new();
        let c = g
            .generate(p, &SamplingParams::greedy(), opts, &mut |e| {
                events.push(e);
                ControlFlow::Continue(())
            })
            .expect("generate");
        (c, events)
    }

    fn streamed(events: &[Event]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Token { text, .. } | Event::Text { text } => Some(text.as_str()),
                Event::PromptProcessed { .. } => None,
            })
            .collect()
    }

    #[test]
    fn streams_until_eos_and_text_matches_events() {
        let (mut g, p, _) = scripted("fn main() {", " println!(\"héllo 🦀\"); }");
        let (c, events) = collect(&mut g, &p, &GenerateOptions::default());
        assert_eq!(c.text, " println!(\"héllo 🦀\"); }");
        assert_eq!(streamed(&events), c.text);
        assert_eq!(c.finish_reason, FinishReason::Eos(2));
        assert_eq!(c.completion_tokens, c.token_ids.len() + 1);
        assert!(matches!(
            events[0],
            Event::PromptProcessed {
                reused_tokens: 0,
                ..
            }
        ));
        for e in &events {
            if let Event::Token { text, .. } = e {
                assert!(!text.contains('\u{FFFD}'));
            }
        }
        // ignore_eos runs on to max_tokens.
        let (c, _) = collect(
            &mut g,
            &p,
            &GenerateOptions {
                max_tokens: 40,
                ignore_eos: true,
                ..Default::default()
            },
        );
        assert_eq!(c.completion_tokens, 40);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }

    #[test]
    fn stop_strings_are_never_emitted() {
        let (mut g, p, _) = scripted("x", "alpha\nbeta\n\nSTOP gamma");
        let opts = GenerateOptions {
            stop: vec!["\n\n".into(), "gamma".into()],
            ..Default::default()
        };
        let (c, events) = collect(&mut g, &p, &opts);
        assert_eq!(c.text, "alpha\nbeta");
        assert_eq!(streamed(&events), "alpha\nbeta");
        assert_eq!(c.finish_reason, FinishReason::StopString("\n\n".into()));
        // A partial stop match at the end of the stream is released.
        let (mut g, p, _) = scripted("x", "one two thr");
        let opts = GenerateOptions {
            stop: vec!["three".into()],
            ..Default::default()
        };
        let (c, events) = collect(&mut g, &p, &opts);
        assert_eq!(c.text, "one two thr");
        assert_eq!(streamed(&events), "one two thr");
    }

    #[test]
    fn stop_matcher_holds_back_possible_prefixes() {
        let mut m = StopMatcher::new(&["</tool>".into(), "END".into()]);
        assert_eq!(m.push("abc <"), ("abc ".into(), None));
        assert_eq!(m.push("/to"), (String::new(), None));
        assert_eq!(m.push("x"), ("</tox".into(), None));
        assert_eq!(m.push("E"), (String::new(), None));
        assert_eq!(m.push("NZ EN"), ("ENZ ".into(), None));
        assert_eq!(m.push("D tail"), (String::new(), Some("END".into())));
        let mut m = StopMatcher::new(&["é!".into()]);
        assert_eq!(m.push("caf"), ("caf".into(), None));
        assert_eq!(m.push("é"), (String::new(), None));
        assert_eq!(m.flush(), "é");
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("anything"), ("anything".into(), None));
    }

    /// The matcher before it was made incremental (issue 16 item 9), fed one
    /// character at a time: the reference for the incremental one.
    fn naive_stop(stops: &[String], text: &str) -> (String, Option<String>) {
        let mut pending = String::new();
        let mut out = String::new();
        for ch in text.chars() {
            pending.push(ch);
            let hit = stops
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| {
                    pending
                        .find(s.as_str())
                        .map(|at| (at, std::cmp::Reverse(s.len()), s))
                })
                .min();
            if let Some((at, _, s)) = hit {
                out.push_str(&pending[..at]);
                return (out, Some(s.clone()));
            }
            let mut hold = 0;
            for s in stops.iter().filter(|s| !s.is_empty()) {
                for n in (1..s.len().min(pending.len() + 1)).rev() {
                    let cut = pending.len() - n;
                    if n > hold && pending.is_char_boundary(cut) && s.starts_with(&pending[cut..]) {
                        hold = n;
                        break;
                    }
                }
            }
            let cut = pending.len() - hold;
            out.push_str(&pending[..cut]);
            pending.drain(..cut);
        }
        out.push_str(&pending);
        (out, None)
    }

    #[test]
    fn stop_matching_is_incremental_and_agrees_with_the_naive_matcher() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let alphabet = ['a', 'b', 'é', 'c'];
        let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
            let n = rng.gen_range(0..=max);
            (0..n)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..rng.gen_range(0..4))
                .map(|_| word(&mut rng, 5))
                .collect();
            let text = word(&mut rng, 40);
            let want = naive_stop(&stops, &text);
            // Pushed in random pieces (on character boundaries).
            let mut m = StopMatcher::new(&stops);
            let chars: Vec<char> = text.chars().collect();
            let (mut got, mut matched, mut i) = (String::new(), None, 0);
            while i < chars.len() && matched.is_none() {
                let j = (i + rng.gen_range(1..=6)).min(chars.len());
                let piece: String = chars[i..j].iter().collect();
                let (out, hit) = m.push(&piece);
                got.push_str(&out);
                matched = hit;
                i = j;
            }
            if matched.is_none() {
                got.push_str(&m.flush());
            }
            assert_eq!((got, matched), want, "stops {stops:?}, text {text:?}");
        }
    }

    /// Issue 16 item 9: 16 stop strings of 1 MB stalled the server for 25 s,
    /// because every step searched the whole held-back text for each of
    /// them. Long self-overlapping stop strings and a long near-miss text
    /// must still match exactly, holding back only a possible prefix.
    #[test]
    fn hostile_stop_strings_are_matched_incrementally() {
        let long = "a".repeat(100_000) + "b";
        let stops = vec![long.clone(), "a".repeat(50_000) + "c"];
        let mut m = StopMatcher::new(&stops);
        let mut released = 0;
        for _ in 0..300 {
            let (out, hit) = m.push(&"a".repeat(1000));
            assert!(hit.is_none());
            released += out.len();
        }
        // Everything but the last 100,000 a's (a possible start) is out.
        assert_eq!(released, 300_000 - 100_000);
        let (out, hit) = m.push("b!");
        assert_eq!((out.len(), hit), (0, Some(long)));
    }

    #[test]
    fn cancellation_and_max_tokens() {
        let (mut g, p, _) = scripted("x", "a b c d e f g h");
        let mut n = 0;
        let c = g
            .generate(
                &p,
                &SamplingParams::greedy(),
                &GenerateOptions::default(),
                &mut |e| {
                    if matches!(e, Event::Token { .. }) {
                        n += 1;
                    }
                    if n == 3 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .expect("generate");
        assert_eq!(c.finish_reason, FinishReason::Cancelled);
        assert_eq!(c.token_ids.len(), 3);
        let (c, _) = collect(
            &mut g,
            &p,
            &GenerateOptions {
                max_tokens: 2,
                ..Default::default()
            },
        );
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.token_ids.len(), 2);
    }

    #[test]
    fn prompt_prefix_is_reused_on_the_prefill_grid() {
        let (mut g, p, calls) = scripted("def f(x):\n    return x + 1\n", " # done");
        g.set_prefill_chunk(4);
        let (c, _) = collect(&mut g, &p, &GenerateOptions::default());
        assert_eq!(c.reused_prompt_tokens, 0);
        {
            let calls = calls.lock().expect("lock");
            let prefill: Vec<&Vec<u32>> = calls.iter().take(p.len().div_ceil(4)).collect();
            assert!(prefill.iter().all(|c| c.len() <= 4));
            assert_eq!(prefill.iter().map(|c| c.len()).sum::<usize>(), p.len());
        }
        // It ended on EOS: every non-EOS token was fed (to get the logits
        // that chose the next one); the EOS itself never was.
        assert_eq!(c.finish_reason, FinishReason::Eos(2));
        assert_eq!(g.cached_tokens(), p.len() + c.token_ids.len());
        // The next prompt extends prompt + completion: the state is reused
        // only up to the last whole grid chunk of the prompt's prefill (the
        // tail chunk and the decoded tokens were computed in other splits
        // than a fresh prefill of `next` would use), and the rest is fed on
        // the grid.
        let mut next = p.clone();
        next.extend(&c.token_ids);
        next.extend([201, 201]);
        calls.lock().expect("lock").clear();
        let (c2, events) = collect(
            &mut g,
            &next,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        let kept = p.len() / 4 * 4;
        assert!(kept > 0 && kept < p.len(), "the test needs a tail chunk");
        assert_eq!(c2.reused_prompt_tokens, kept);
        assert!(
            matches!(events[0], Event::PromptProcessed { reused_tokens, .. } if reused_tokens == kept)
        );
        {
            let calls = calls.lock().expect("lock");
            let fed: Vec<u32> = calls
                .iter()
                .take_while(|c| c.len() == 4)
                .flatten()
                .copied()
                .collect();
            assert_eq!(calls[0], next[kept..kept + 4].to_vec());
            assert!(fed.len() >= (next.len() - kept) / 4 * 4);
        }
        // The same prompt again re-feeds from its last grid point before
        // its last token.
        let (c3, _) = collect(
            &mut g,
            &next,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c3.reused_prompt_tokens, (next.len() - 1) / 4 * 4);
        // A prompt diverging inside the first chunk reuses nothing.
        let mut other = p[..3].to_vec();
        other.push(7);
        let (c4, _) = collect(
            &mut g,
            &other,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c4.reused_prompt_tokens, 0);
        // One diverging after the first chunk keeps that chunk.
        let mut other = p[..5].to_vec();
        other.push(7);
        g.reset();
        let _ = collect(
            &mut g,
            &p,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        let (c5, _) = collect(
            &mut g,
            &other,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c5.reused_prompt_tokens, 4);
        // A new grid reuses nothing computed on the old one.
        g.set_prefill_chunk(2);
        let (c6, _) = collect(
            &mut g,
            &p,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c6.reused_prompt_tokens, 0);
        // Without exact reuse (`mfx chat`), the whole common prefix is
        // reused: the prompt and what was decoded after it.
        g.set_exact_prefix_reuse(false);
        g.reset();
        let (c7, _) = collect(&mut g, &p, &GenerateOptions::default());
        let mut next = p.clone();
        next.extend(&c7.token_ids);
        next.push(201);
        let (c8, _) = collect(
            &mut g,
            &next,
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c8.reused_prompt_tokens, p.len() + c7.token_ids.len());
    }

    #[test]
    fn models_that_cannot_truncate_are_reset() {
        let tok = tiny_tokenizer();
        let (mut model, calls) = ScriptModel::new(vec![5; 64], tok.vocab_size());
        model.can_truncate = false;
        let mut g = Generator::new(Box::new(model), tok, None, GenerationConfig::default());
        let (_, _) = collect(
            &mut g,
            &[3, 4, 5],
            &GenerateOptions {
                max_tokens: 3,
                ..Default::default()
            },
        );
        calls.lock().expect("lock").clear();
        let (c, _) = collect(
            &mut g,
            &[3, 4, 9],
            &GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c.reused_prompt_tokens, 0);
        assert_eq!(calls.lock().expect("lock")[0], vec![3, 4, 9]);
    }

    #[test]
    fn bad_requests_are_errors() {
        let (mut g, p, _) = scripted("x", "y");
        let mut noop = |_: Event| ControlFlow::Continue(());
        let e = g
            .generate(
                &[],
                &SamplingParams::greedy(),
                &GenerateOptions::default(),
                &mut noop,
            )
            .expect_err("empty");
        assert!(matches!(e, GenerateError::EmptyPrompt));
        let e = g
            .generate(
                &[1 << 20],
                &SamplingParams::greedy(),
                &GenerateOptions::default(),
                &mut noop,
            )
            .expect_err("oov");
        assert!(e.to_string().contains("out of range"), "{e}");
        let long = vec![5u32; 65];
        let e = g
            .generate(
                &long,
                &SamplingParams::greedy(),
                &GenerateOptions::default(),
                &mut noop,
            )
            .expect_err("long");
        assert!(matches!(
            e,
            GenerateError::PromptTooLong {
                prompt: 65,
                context: 64
            }
        ));
        let bad = SamplingParams {
            top_p: -1.0,
            ..Default::default()
        };
        assert!(g
            .generate(&p, &bad, &GenerateOptions::default(), &mut noop)
            .is_err());
        // The context caps max_tokens.
        let (mut g, _, _) = scripted("x", "y");
        let p = vec![5u32; 60];
        let (c, _) = collect(
            &mut g,
            &p,
            &GenerateOptions {
                max_tokens: 100,
                ignore_eos: true,
                ..Default::default()
            },
        );
        assert_eq!(c.completion_tokens, 4);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }

    #[test]
    fn chat_prompts_use_the_template_and_eos_set() {
        let (g, _, _) = scripted("x", "y");
        assert_eq!(g.eos_ids(), &[0, 2]);
        let ids = g
            .encode_chat(
                &[message("user", "Write a Python function `read_lines(path)`: Return the lines of a text file without trailing newlines.")],
                &RenderOptions { add_generation_prompt: true, ..Default::default() },
            )
            .expect("chat");
        let r: Json = serde_json::from_str(
            &std::fs::read_to_string(shared_model(
                "tiny-qwen3-moe-coder/reference/reference.json",
            ))
            .expect("ref"),
        )
        .expect("json");
        let expected: Vec<u32> = r["prompts"]["chat"]["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn generation_config_parsing() {
        let c =
            GenerationConfig::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("cfg");
        assert_eq!(c.eos_token_ids, vec![2, 0]);
        let p = c.sampling_defaults();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.7, 0.9, 40));
        let c = GenerationConfig::from_json_str(r#"{"eos_token_id": 7, "temperature": 0.6}"#, "g")
            .expect("cfg");
        assert_eq!(c.eos_token_ids, vec![7]);
        assert!(
            c.sampling_defaults().is_greedy(),
            "no do_sample means greedy, as in transformers"
        );
        let e = GenerationConfig::from_json_str(r#"{"eos_token_id": "x"}"#, "gen.json")
            .expect_err("bad");
        assert!(
            e.to_string().contains("gen.json") && e.to_string().contains("eos_token_id"),
            "{e}"
        );
        let e = GenerationConfig::from_json_str(r#"{"top_k": -1}"#, "gen.json").expect_err("bad");
        assert!(e.to_string().contains("top_k"), "{e}");
        assert_eq!(
            GenerationConfig::from_model_dir(Path::new("/nonexistent")).expect("absent"),
            GenerationConfig::default()
        );
    }

    /// Token ids and the bits of their log-probabilities.
    fn greedy_bits(g: &mut Generator, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<u32>) {
        let opts = GenerateOptions {
            max_tokens: n,
            ignore_eos: true,
            logprobs: Some(0),
            ..Default::default()
        };
        let (c, events) = collect(g, prompt, &opts);
        let bits = events
            .iter()
            .filter_map(|e| match e {
                Event::Token { logprob, .. } => {
                    Some(logprob.as_ref().expect("asked for").logprob.to_bits())
                }
                _ => None,
            })
            .collect();
        (c.token_ids, bits)
    }

    /// Issue 23: `class Stack:` after an unrelated chat gave another greedy
    /// continuation than sent twice, because the reused prefix had been
    /// computed in another batch split (int8 activations accumulate
    /// differently for 1-4 rows than for more). The 4-bit model runs the
    /// int8 kernels on the default tier; the logits' bits must not depend
    /// on what ran before.
    #[test]
    fn greedy_output_does_not_depend_on_what_ran_before() {
        let dir = shared_model("tiny-qwen3-moe-coder-mlx-4bit");
        let mut g = Generator::load(&dir, &LoadOptions::default()).expect("load");
        // A small grid, so that reuse happens within these short prompts.
        g.set_prefill_chunk(16);
        let system = "You are a careful Python assistant. Answer with code only, \
            no prose, and keep every answer short, idiomatic and typed.";
        let chat = |g: &Generator, user: &str| {
            let opts = RenderOptions {
                tools: None,
                add_generation_prompt: true,
                extra: Default::default(),
            };
            g.encode_chat(&[message("system", system), message("user", user)], &opts)
                .expect("chat")
        };
        let p = chat(&g, "class Stack:");
        let other = chat(&g, "Write a haiku about the sea.");
        let fresh = greedy_bits(&mut g, &p, 24);
        // After an unrelated chat sharing the system prompt.
        g.reset();
        let _ = greedy_bits(&mut g, &other, 24);
        let after_other = greedy_bits(&mut g, &p, 24);
        assert_eq!(after_other, fresh, "after an unrelated chat");
        // Twice in a row.
        let again = greedy_bits(&mut g, &p, 24);
        assert_eq!(again, fresh, "sent twice");
        // A prompt that extends the previous prompt and its reply: the
        // reply's state was decoded token by token, a fresh prefill
        // computes it in chunks.
        let mut q = p.clone();
        q.extend(&fresh.0[..12]);
        let after_prefix = greedy_bits(&mut g, &q, 16);
        g.reset();
        let q_fresh = greedy_bits(&mut g, &q, 16);
        assert_eq!(after_prefix, q_fresh, "after its own prefix");
    }

    /// The reported log-probabilities are the model's: greedy tokens are
    /// the most likely ones, and a sampled completion's log-probabilities
    /// (and their sum) equal what scoring its tokens in one separate
    /// forward pass gives.
    #[test]
    fn logprobs_are_the_models_scores_of_the_sampled_tokens() {
        let dir = shared_model("tiny-qwen3-moe-coder");
        let mut g = Generator::load(&dir, &LoadOptions::default()).expect("load");
        let reference: Json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference/reference.json")).expect("reference"),
        )
        .expect("json");
        let case = &reference["prompts"]["python"];
        let prompt = g
            .encode_prompt(case["text"].as_str().expect("text"))
            .expect("prompt");
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(prompt, ids);
        let opts = GenerateOptions {
            max_tokens: 20,
            ignore_eos: true,
            logprobs: Some(5),
            ..Default::default()
        };
        let logprobs = |events: &[Event]| -> Vec<(u32, TokenLogprob)> {
            events
                .iter()
                .filter_map(|e| match e {
                    Event::Token { id, logprob, .. } => {
                        Some((*id, logprob.clone().expect("asked")))
                    }
                    _ => None,
                })
                .collect()
        };
        let (c, events) = collect(&mut g, &prompt, &opts);
        let greedy = logprobs(&events);
        assert_eq!(greedy.len(), c.token_ids.len());
        // The first token against transformers' float32 logits of the
        // prompt's last position (`python.logits.npy`, [positions, vocab]).
        let npy = std::fs::read(dir.join("reference/python.logits.npy")).expect("npy");
        let vocab = g.model_info().vocab_size;
        let last: Vec<f32> = npy[npy.len() - 4 * vocab..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want = LogitsSummary::of(&last, 5);
        let (first, lp0) = &greedy[0];
        assert_eq!(*first as u64, case["greedy_48"][0].as_u64().expect("id"));
        assert!(
            (lp0.logprob - (last[*first as usize] - want.lse)).abs() < 1e-3,
            "{} vs transformers {}",
            lp0.logprob,
            last[*first as usize] - want.lse
        );
        for ((id, l), (rid, rl)) in lp0.top.iter().zip(&want.top) {
            assert_eq!(id, rid);
            assert!((l - rl).abs() < 1e-3, "top {id}: {l} vs transformers {rl}");
        }
        for (id, lp) in &greedy {
            assert_eq!(lp.top.len(), 5);
            assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
            assert_eq!(lp.top[0].1, lp.logprob);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", lp.top);
            assert!(lp.logprob <= 0.0);
        }
        // Sampled at temperature 1 with top-k: tokens that are not the
        // most likely ones are scored too.
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 20,
            seed: Some(11),
            ..Default::default()
        };
        let mut events = Vec::new();
        g.reset();
        let c = g
            .generate(&prompt, &params, &opts, &mut |e| {
                events.push(e);
                ControlFlow::Continue(())
            })
            .expect("generate");
        let sampled = logprobs(&events);
        assert!(
            sampled.iter().any(|(id, lp)| lp.top[0].0 != *id),
            "the seed should sample some token that is not the argmax"
        );
        // Scored by a separate model in the same split (the prompt, then
        // one token at a time): the same numbers, bit for bit, and so the
        // same sum.
        let mut model = crate::load::load(&dir, &LoadOptions::default()).expect("load");
        let mut step = model.forward(&prompt, false).expect("prompt");
        let (mut got, mut want) = (0.0f64, 0.0f64);
        for (id, lp) in &sampled {
            let scored = step[*id as usize] - LogitsSummary::of(&step, 0).lse;
            assert_eq!(
                lp.logprob.to_bits(),
                scored.to_bits(),
                "{} vs {scored}",
                lp.logprob
            );
            got += lp.logprob as f64;
            want += scored as f64;
            step = model.forward(&[*id], false).expect("step");
        }
        assert_eq!(got, want);
        // Scored in one forward pass over the whole sequence: the same
        // math summed in another order (f32 activations, f16 KV).
        let mut model = crate::load::load(&dir, &LoadOptions::default()).expect("load");
        let mut seq = prompt.clone();
        seq.extend(&c.token_ids);
        let all = model.forward(&seq, true).expect("score");
        let mut whole = 0.0f64;
        for (i, (id, lp)) in sampled.iter().enumerate() {
            let row = &all[(prompt.len() - 1 + i) * vocab..][..vocab];
            let scored = row[*id as usize] - LogitsSummary::of(row, 0).lse;
            assert!(
                (lp.logprob - scored).abs() < 1e-2,
                "token {i}: {} vs {scored}",
                lp.logprob
            );
            whole += scored as f64;
        }
        assert!(
            (got - whole).abs() < 2e-2,
            "sum {got} vs one-pass scoring {whole}"
        );
    }

    #[test]
    fn generator_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Generator>();
    }
}
