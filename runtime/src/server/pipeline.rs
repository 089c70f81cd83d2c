//! The provider-neutral part of a request: prompt to tokens, parameters to
//! a resolved [`GenParams`], the queue, and the worker's text deltas turned
//! into text and tool-call events. The OpenAI and Anthropic modules only
//! translate JSON in and out of this.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::mpsc::UnboundedReceiver;

use super::backend::{BackendError, ChatPrompt, Completion, Finish, GenParams, Logprob, Penalties};
use super::constraint::{self, ResponseFormat};
use super::error::{ApiError, Flavor};
use super::toolchoice::{Mode, ToolChoice};
use super::worker::Event;
use super::AppState;
use crate::toolcall::{OutputParser, ParserSpec, ToolEvent, ToolSchemas};

/// Where the prompt comes from.
pub enum PromptSource {
    /// A chat, with the request's resolved `tool_choice`.
    Chat(ChatPrompt, ToolChoice),
    /// Raw text for `/v1/completions`: no template.
    Text(String),
}

/// The sampling fields every provider has, before defaults.
#[derive(Debug, Default, Clone)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub penalties: Penalties,
    /// Alternatives per token when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    /// A JSON reply (`response_format`), enforced by a grammar.
    pub response_format: Option<ResponseFormat>,
}

/// A request ready for the queue.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Present for chat prompts: how to split the output into reasoning,
    /// text and (when the request offered tools) tool calls.
    pub parser: Option<ParserSpec>,
    /// Text the server wrote at the start of the assistant turn (the end of
    /// `prompt`) to force a tool call; the parser reads it as model output.
    pub forced: String,
    /// More than one tool call allowed in the reply.
    pub parallel_calls: bool,
}

/// A prompt rendered and tokenized, before any check against the context.
pub struct Rendered {
    pub prompt: Vec<u32>,
    pub parser: Option<ParserSpec>,
    pub forced: String,
    pub parallel_calls: bool,
    /// The reply's grammar (a forced tool call, `response_format`).
    pub grammar: Option<crate::constrain::Grammar>,
}

/// Renders and tokenizes the prompt off the async threads (also what
/// Anthropic's `count_tokens` counts).
pub async fn render(
    state: &Arc<AppState>,
    flavor: Flavor,
    source: PromptSource,
) -> Result<Rendered, ApiError> {
    render_constrained(state, flavor, source, None).await
}

/// [`render`], and the grammar the reply must follow: a forced tool call's
/// (see `constraint`), else `response_format`'s.
pub async fn render_constrained(
    state: &Arc<AppState>,
    flavor: Flavor,
    source: PromptSource,
    response_format: Option<ResponseFormat>,
) -> Result<Rendered, ApiError> {
    let mut source = source;
    let mut parallel_calls = true;
    let tools = match &mut source {
        PromptSource::Chat(c, choice) => {
            parallel_calls = choice.parallel;
            if choice.mode == Mode::None {
                // The model is not told about tools it may not use, and
                // whatever it writes is text.
                c.tools.clear();
            }
            c.tools.iter_mut().for_each(complete_parameters);
            (!c.tools.is_empty()).then(|| ToolSchemas::from_openai_tools(&c.tools))
        }
        PromptSource::Text(_) => None,
    };
    let backend = state.backend.clone();
    type Out = (
        Vec<u32>,
        String,
        Option<ParserSpec>,
        Option<crate::constrain::Grammar>,
    );
    let (prompt, forced, parser, grammar) =
        tokio::task::spawn_blocking(move || -> Result<Out, ApiError> {
            let be = |e| backend_error(flavor, e);
            let (mut text, forced, spec, constraint) = match source {
                PromptSource::Chat(mut chat, choice) => {
                    let template = backend.template_source();
                    if let Some(src) = template {
                        crate::chat::adapt_reasoning_field(&mut chat.messages, src);
                    }
                    let mut text = backend.render_chat(&chat).map_err(be)?;
                    text.push_str(&chat.prefill);
                    let spec = ParserSpec::new(template, &text, tools);
                    let forced = if choice.forces_call() {
                        spec.format
                            .forced_prefix(choice.forced_name(&chat.tools), spec.in_reasoning)
                    } else {
                        String::new()
                    };
                    let constraint = constraint::for_chat(
                        flavor,
                        spec.format,
                        &choice,
                        &chat.tools,
                        response_format.as_ref(),
                        spec.in_reasoning,
                        backend.special_tokens(),
                    )?;
                    (text, forced, Some(spec), constraint)
                }
                PromptSource::Text(t) => (
                    t,
                    String::new(),
                    None,
                    constraint::for_text(response_format.as_ref()),
                ),
            };
            let grammar = match constraint {
                Some(c) => backend
                    .compile_grammar(&c.lark, &forced)
                    .map_err(|e| constraint::to_api(flavor, e, c.field))?,
                None => None,
            };
            text.push_str(&forced);
            Ok((backend.tokenize(&text).map_err(be)?, forced, spec, grammar))
        })
        .await
        .map_err(|e| {
            ApiError::new(
                flavor,
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("prompt preparation failed: {e}"),
            )
        })??;
    Ok(Rendered {
        prompt,
        parser,
        forced,
        parallel_calls,
        grammar,
    })
}

/// Renders and tokenizes the prompt and resolves the sampling parameters
/// against the model's defaults and context.
pub async fn prepare(
    state: &Arc<AppState>,
    flavor: Flavor,
    source: PromptSource,
    sampling: SamplingRequest,
) -> Result<Prepared, ApiError> {
    let Rendered {
        prompt,
        parser,
        forced,
        parallel_calls,
        grammar,
    } = render_constrained(state, flavor, source, sampling.response_format.clone()).await?;
    let info = state.backend.info();
    let ctx = info.context_length;
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            flavor,
            "the prompt is empty after tokenization",
        ));
    }
    if prompt.len() >= ctx {
        // Anthropic's wording: Claude Code recognizes "prompt is too long"
        // and tells the user (or compacts) instead of retrying.
        let msg = match flavor {
            Flavor::Anthropic => format!(
                "prompt is too long: {} tokens > {} maximum (this model's context is {ctx} tokens, which leaves no room to generate; start `mfx serve` with a larger --max-context)",
                prompt.len(),
                ctx - 1
            ),
            // vLLM's wording ("maximum context length"), which litellm
            // (Aider) matches to report a context-window error.
            Flavor::OpenAi => format!(
                "This model's maximum context length is {ctx} tokens; the prompt is {} tokens long, which leaves no room to generate (start `mfx serve` with a larger --max-context)",
                prompt.len()
            ),
        };
        return Err(ApiError::bad_request(flavor, msg)
            .param("messages")
            .code("context_length_exceeded"));
    }
    let mut params = resolve(flavor, &sampling, info.defaults, ctx - prompt.len())?;
    params.grammar = grammar;
    Ok(Prepared {
        prompt,
        params,
        parser,
        forced,
        parallel_calls,
    })
}

/// Folds system messages that are not at the start of a conversation (Claude
/// Code sends them mid-conversation; Codex sends several developer messages)
/// into shapes every chat template renders: the leading run of system
/// messages becomes one system message; a later one is appended to the user
/// message before it, or becomes a user message of its own. Order is kept,
/// so the rendered prefix of earlier turns (and its cached KV state) does
/// not change when a new system message arrives.
pub fn fold_system_messages(messages: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(messages.len());
    let text = |m: &serde_json::Value| m["content"].as_str().unwrap_or("").to_owned();
    for m in messages {
        if m["role"] != "system" {
            out.push(m);
            continue;
        }
        let t = text(&m);
        if t.is_empty() {
            continue;
        }
        let leading = out.iter().all(|o| o["role"] == "system");
        match out.last_mut() {
            Some(last) if leading || last["role"] == "user" => {
                let joined = format!("{}\n\n{t}", text(last));
                last["content"] = serde_json::Value::String(joined);
            }
            None => out.push(m),
            Some(_) => out.push(serde_json::json!({"role": "user", "content": t})),
        }
    }
    out
}

/// Gives a tool without `parameters` or without `properties` an empty
/// `properties` object: the same schema, but templates that iterate over
/// `parameters.properties` (Qwen3-Coder's) fail on a missing one, and
/// Anthropic clients often send `{"type": "object"}` for tools without input.
fn complete_parameters(tool: &mut serde_json::Value) {
    let Some(func) = tool.get_mut("function").and_then(|f| f.as_object_mut()) else {
        return;
    };
    let params = func
        .entry("parameters")
        .or_insert_with(|| serde_json::json!({"type": "object"}));
    if let Some(p) = params.as_object_mut() {
        p.entry("properties")
            .or_insert_with(|| serde_json::json!({}));
    }
}

/// Checks ranges and fills defaults. `room` is what the context leaves.
fn resolve(
    flavor: Flavor,
    s: &SamplingRequest,
    d: super::backend::SamplingDefaults,
    room: usize,
) -> Result<GenParams, ApiError> {
    let bad = |param: &str, msg: String| ApiError::bad_request(flavor, msg).param(param);
    let temperature = s.temperature.unwrap_or(d.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = s.top_p.unwrap_or(d.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match s.top_k {
        None => d.top_k,
        // Anthropic and several OpenAI-compatible servers use -1 or 0 for "off".
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
    };
    let max_tokens = match s.max_tokens {
        None => room,
        Some(n) if n < 1 => {
            return Err(bad(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ))
        }
        Some(n) => (n as usize).min(room),
    };
    check_penalties(flavor, &s.penalties)?;
    check_stops(flavor, &s.stop)?;
    let stop = s.stop.iter().filter(|x| !x.is_empty()).cloned().collect();
    Ok(GenParams {
        temperature,
        top_p,
        top_k,
        seed: s.seed,
        max_tokens,
        stop,
        ignore_eos: s.ignore_eos,
        penalties: s.penalties.clone(),
        logprobs: s.logprobs,
        grammar: None,
    })
}

/// Range checks of the optional sampler fields, naming the field.
fn check_penalties(flavor: Flavor, p: &Penalties) -> Result<(), ApiError> {
    let bad = |param: &str, msg: String| Err(ApiError::bad_request(flavor, msg).param(param));
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
            return bad(name, format!("{name} must be between -2 and 2, got {v}"));
        }
    }
    if let Some(v) = p
        .repetition_penalty
        .filter(|v| !(v.is_finite() && *v > 0.0))
    {
        return bad(
            "repetition_penalty",
            format!("repetition_penalty must be a number > 0, got {v}"),
        );
    }
    if let Some(v) = p.min_p.filter(|v| !(0.0..=1.0).contains(v)) {
        return bad("min_p", format!("min_p must be between 0 and 1, got {v}"));
    }
    if let Some((id, b)) = p
        .logit_bias
        .iter()
        .find(|(_, b)| !(-100.0..=100.0).contains(b))
    {
        return bad(
            "logit_bias",
            format!("logit_bias: the bias of token {id} must be between -100 and 100, got {b}"),
        );
    }
    Ok(())
}

/// Most stop strings a request may give (OpenAI allows 4, Anthropic does
/// not say; 16 covers every client seen).
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes. Matching is incremental whatever the
/// length (see `generate::StopMatcher`), but each one is held in memory and
/// its matcher costs 4 bytes a byte; real stop strings are a few words.
pub const MAX_STOP_BYTES: usize = 4096;

/// Refuses more than [`MAX_STOPS`] stop strings or one longer than
/// [`MAX_STOP_BYTES`], naming the provider's field.
fn check_stops(flavor: Flavor, stops: &[String]) -> Result<(), ApiError> {
    let field = match flavor {
        Flavor::OpenAi => "stop",
        Flavor::Anthropic => "stop_sequences",
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_request(
            flavor,
            format!(
                "{field}: at most {MAX_STOPS} stop sequences are allowed, got {}",
                stops.len()
            ),
        )
        .param(field));
    }
    if let Some((i, s)) = stops
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::bad_request(
            flavor,
            format!(
                "{field}[{i}] is {} bytes long; a stop sequence may be at most {MAX_STOP_BYTES} bytes",
                s.len()
            ),
        )
        .param(format!("{field}[{i}]")));
    }
    Ok(())
}

pub fn backend_error(flavor: Flavor, e: BackendError) -> ApiError {
    match e {
        BackendError::Invalid(m) => ApiError::bad_request(flavor, m),
        BackendError::Internal(m) => ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// Submits to the queue; a full queue is a 429.
pub fn start(state: &Arc<AppState>, flavor: Flavor, p: Prepared) -> Result<Generation, ApiError> {
    let (rx, halt) = state.worker.submit(p.prompt, p.params).map_err(|_| {
        ApiError::new(
            flavor,
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy: the request queue is full; retry later",
        )
    })?;
    let mut gen = Generation {
        rx,
        parser: None,
        pending: VecDeque::new(),
        done: false,
        halt,
        parallel_calls: p.parallel_calls,
        calls: 0,
        record: super::access::Record::current(),
    };
    if let Some(spec) = p.parser {
        let (parser, events) = OutputParser::with_prefix(spec, &p.forced);
        gen.parser = Some(parser);
        gen.forward(events, false);
    }
    Ok(gen)
}

/// What a generation produces, in order.
#[derive(Debug)]
pub enum Out {
    Text(String),
    /// Reasoning, returned apart from the text (`reasoning_content`,
    /// `thinking` blocks).
    Reasoning(String),
    ToolStart {
        index: usize,
        name: String,
    },
    ToolArgs {
        index: usize,
        json: String,
    },
    ToolEnd {
        index: usize,
        /// False when the generation stopped inside the call (the token
        /// limit): its arguments are what was written so far.
        complete: bool,
    },
    /// A token's log-probability (asked-for only), ahead of the text the
    /// parser makes of it.
    Logprob(Logprob),
    /// The end; `tool_calls` says how many calls the output held.
    Finished {
        completion: Completion,
        tool_calls: usize,
    },
    Failed(BackendError),
}

/// A running generation. Dropping it cancels the work.
pub struct Generation {
    rx: UnboundedReceiver<Event>,
    parser: Option<OutputParser>,
    pending: VecDeque<Out>,
    done: bool,
    /// Set to end the generation early (the worker reads it between tokens).
    halt: Arc<AtomicBool>,
    parallel_calls: bool,
    /// Tool calls begun in what was forwarded.
    calls: usize,
    /// The request's access-log record, told the usage at the end.
    record: Option<Arc<super::access::Record>>,
}

impl Generation {
    /// True once the reply is complete and the rest of the output is ignored.
    fn halted(&self) -> bool {
        self.halt.load(Ordering::Relaxed)
    }

    /// Queues parser events; without parallel calls, the end of the first
    /// call is the end of the reply: the worker is told to stop, and what
    /// the model wrote after it is dropped.
    fn forward(&mut self, events: Vec<ToolEvent>, cut: bool) {
        for e in events {
            if self.halted() {
                return;
            }
            let end = matches!(e, ToolEvent::CallEnd { .. });
            if matches!(e, ToolEvent::CallStart { .. }) {
                self.calls += 1;
            }
            self.pending.push_back(to_out(e, cut));
            if end && !self.parallel_calls {
                self.halt.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The next event, or `None` after `Finished`/`Failed`.
    pub async fn next(&mut self) -> Option<Out> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(Event::Started) => {}
                // Tokens the worker made before it saw the halt are dropped.
                Some(Event::Delta(_) | Event::Logprob(_)) if self.halted() => {}
                Some(Event::Logprob(lp)) => self.pending.push_back(Out::Logprob(lp)),
                Some(Event::Delta(text)) => match &mut self.parser {
                    None => self.pending.push_back(Out::Text(text)),
                    Some(p) => {
                        let evs = p.push(&text);
                        self.forward(evs, false);
                    }
                },
                Some(Event::Done(result)) => {
                    self.done = true;
                    // A call the parser closes only now was cut off if the
                    // generation ran out of tokens.
                    let cut = matches!(&result, Ok(c) if c.finish == Finish::Length);
                    if let Some(p) = &mut self.parser {
                        let evs = p.finish();
                        self.forward(evs, cut);
                    }
                    if let (Ok(c), Some(r)) = (&result, &self.record) {
                        r.completed(c);
                    }
                    self.pending.push_back(match result {
                        Ok(completion) => Out::Finished {
                            completion,
                            tool_calls: self.calls,
                        },
                        Err(e) => Out::Failed(e),
                    });
                }
                None => {
                    // The worker dropped the job without an answer: only when
                    // the thread itself died.
                    self.done = true;
                    self.pending.push_back(Out::Failed(BackendError::Internal(
                        "the generation worker stopped".into(),
                    )));
                }
            }
        }
    }
}

fn to_out(e: ToolEvent, cut: bool) -> Out {
    match e {
        ToolEvent::Text(t) => Out::Text(t),
        ToolEvent::Reasoning(t) => Out::Reasoning(t),
        ToolEvent::CallStart { index, name } => Out::ToolStart { index, name },
        ToolEvent::ArgsDelta { index, json } => Out::ToolArgs { index, json },
        ToolEvent::CallEnd { index } => Out::ToolEnd {
            index,
            complete: !cut,
        },
    }
}

/// A short random id for responses and tool calls (`chatcmpl-…`, `toolu_…`).
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let s: String = (0..24)
        .map(|_| {
            let c = rng.gen_range(0..62u8);
            (match c {
                0..=9 => b'0' + c,
                10..=35 => b'a' + c - 10,
                _ => b'A' + c - 36,
            }) as char
        })
        .collect();
    format!("{prefix}{s}")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
