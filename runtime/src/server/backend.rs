//! What the server needs from a model, and nothing more.
//!
//! The server speaks HTTP and the providers' JSON; everything about tokens,
//! templates and weights sits behind [`Backend`]. That keeps the protocol
//! code testable with a fake and lets the engine change underneath it.

use std::time::Duration;

pub use crate::cache::StatsSnapshot;

/// A chat rendered by the model's template. Messages are in the
/// Hugging Face / OpenAI shape that chat templates expect (`role`,
/// `content` as a string, assistant `tool_calls` with `function.arguments`
/// as an object, `tool` messages with `tool_call_id`).
#[derive(Debug, Clone, Default)]
pub struct ChatPrompt {
    pub messages: Vec<serde_json::Value>,
    /// OpenAI-style tool definitions (`{"type":"function","function":{...}}`);
    /// empty when the request has none or chose `tool_choice: "none"`.
    pub tools: Vec<serde_json::Value>,
    /// The start of the assistant's reply, given by the client (Anthropic's
    /// trailing assistant message): written after the rendered prompt, so
    /// the model continues it; the reply holds only the continuation.
    pub prefill: String,
    /// The request's say on reasoning, passed to the template as
    /// `enable_thinking` (Qwen3's switch; templates without it ignore it):
    /// `Some(false)` for Anthropic's `thinking: {type: disabled}`, `None`
    /// leaves the template's default.
    pub enable_thinking: Option<bool>,
}

/// Sampling defaults, normally from the model's `generation_config.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

impl Default for SamplingDefaults {
    /// transformers' own defaults when a model ships no generation config.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
        }
    }
}

/// Static facts about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients send as `model` and `/v1/models` lists.
    pub id: String,
    /// Longest sequence (prompt + completion) the model accepts.
    pub context_length: usize,
    pub defaults: SamplingDefaults,
}

/// The sampler fields requests may set beyond temperature/top-p/top-k
/// (range-checked; see `sampling::SamplingParams` for their meaning).
/// `None` keeps the model's default (none for the OpenAI penalties).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_p: Option<f32>,
    /// (token id, bias) pairs.
    pub logit_bias: Vec<(u32, f32)>,
}

/// One generation, fully resolved (no defaults left to apply).
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Stop strings; the matched one and anything after it are not emitted.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (vLLM's `ignore_eos`, for
    /// benchmarks that need a fixed output length).
    pub ignore_eos: bool,
    pub penalties: Penalties,
    /// Report each token's log-probability and this many alternatives
    /// (see [`Delta::Logprob`]); `None` when the request did not ask.
    pub logprobs: Option<usize>,
    /// The grammar every token must follow (`response_format`, a forced
    /// tool call), compiled by [`Backend::compile_grammar`].
    pub grammar: Option<crate::constrain::Grammar>,
}

/// A sampled token's log-probability under the model (the log-softmax of
/// its raw logits, before sampling filters; see
/// `generate::TokenLogprob`), tokens as their decoded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(String, f32)>,
}

/// What [`Backend::generate`] reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta<'a> {
    /// Text, never splitting a UTF-8 character, never a stop string.
    Text(&'a str),
    /// The next sampled token's log-probability (only when asked for), sent
    /// before the text it releases.
    Logprob(Logprob),
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` (or the context) ran out.
    Length,
    /// A stop string matched; it is the one given.
    Stop(String),
    /// The `on_delta` callback asked to stop (client went away).
    Cancelled,
    /// The server stopped it because the reply was complete: the one tool
    /// call allowed when parallel calls are off. The backend never returns
    /// this itself (it reports `Cancelled`); the worker relabels it.
    Halted,
}

/// The result of [`Backend::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV state was reused from the previous request.
    pub cached_prompt_tokens: usize,
    /// Time from the call to the first generated token (prefill + 1 step).
    pub time_to_first_token: Duration,
    /// Total time of the call.
    pub total_time: Duration,
}

/// A failure inside the backend. `Invalid` is the client's fault (a bad
/// template input, say) and becomes a 400; `Internal` becomes a 500.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

/// The model as the server sees it.
///
/// `render_chat`, `tokenize` and `info` may be called from any thread at any
/// time; `generate` is only ever called by the server's single worker
/// thread, one request after another, so an implementation may keep state
/// (the KV cache of the last request, for prefix reuse) across calls.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// Applies the model's chat template with the generation prompt added.
    fn render_chat(&self, prompt: &ChatPrompt) -> Result<String, BackendError>;

    /// The source of the chat template `render_chat` uses, if any: the
    /// server reads the model's output format (reasoning and tool-call
    /// markup) off it.
    fn template_source(&self) -> Option<&str> {
        None
    }

    /// Compiles a constrained-decoding grammar (Lark text from
    /// `constrain::grammar`), advanced past `prefix`, text the server wrote
    /// at the start of the reply. `Ok(None)`: this backend cannot constrain
    /// its output (the test fakes, which have no tokenizer) and samples freely.
    fn compile_grammar(
        &self,
        _lark: &str,
        _prefix: &str,
    ) -> Result<Option<crate::constrain::Grammar>, crate::constrain::ConstrainError> {
        Ok(None)
    }

    /// The tokenizer's special tokens (their text), so that a grammar names
    /// a marker that is one as a token rather than as text, which the
    /// tokenizer would never produce for it. Empty for the test fakes.
    fn special_tokens(&self) -> &[String] {
        &[]
    }

    /// Token ids of already-rendered text (special tokens parsed, none added).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, BackendError>;

    /// Generates from `prompt`, calling `on_delta` with each piece of text
    /// (never splitting a UTF-8 character, never including a stop string)
    /// and, when `params.logprobs` asks, each token's log-probability.
    /// When `on_delta` returns false the generation stops with
    /// [`Finish::Cancelled`] as soon as possible.
    fn generate(
        &self,
        prompt: &[u32],
        params: &GenParams,
        on_delta: &mut dyn FnMut(Delta<'_>) -> bool,
    ) -> Result<Completion, BackendError>;

    /// The expert cache's counters since start, for `/metrics`; `None`
    /// when the model keeps every expert resident (no cache to report on).
    /// Called from the HTTP threads at any time, also while generating, so
    /// it must not wait for the generation to end.
    fn cache_stats(&self) -> Option<StatsSnapshot> {
        None
    }

    /// The prompt cache's counters (slots, spills, restores), for
    /// `/metrics`; `None` when the backend keeps no slots. Like
    /// [`Backend::cache_stats`], it must not wait for a generation.
    fn slot_stats(&self) -> Option<crate::prompt_cache::SlotStats> {
        None
    }
}
