//! The provider-neutral part of a request: prompt to tokens, parameters to
//! a resolved [`GenParams`], the queue, and the worker's text deltas turned
//! into text and tool-call events. The OpenAI and Anthropic modules only
//! translate JSON in and out of this.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::mpsc::UnboundedReceiver;

use super::backend::{BackendError, ChatPrompt, Completion, GenParams};
use super::error::{ApiError, Flavor};
use super::worker::Event;
use super::AppState;
use crate::toolcall::{ToolCallParser, ToolEvent, ToolSchemas};

/// Where the prompt comes from.
pub enum PromptSource {
    Chat(ChatPrompt),
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
}

/// A request ready for the queue.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Present when the request offered tools: the output is then parsed for calls.
    pub tools: Option<ToolSchemas>,
}

/// Renders and tokenizes the prompt (off the async threads) and resolves
/// the sampling parameters against the model's defaults and context.
pub async fn prepare(
    state: &Arc<AppState>,
    flavor: Flavor,
    source: PromptSource,
    sampling: SamplingRequest,
) -> Result<Prepared, ApiError> {
    let tools = match &source {
        PromptSource::Chat(c) if !c.tools.is_empty() => {
            Some(ToolSchemas::from_openai_tools(&c.tools))
        }
        _ => None,
    };
    let backend = state.backend.clone();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, BackendError> {
        let text = match source {
            PromptSource::Chat(chat) => backend.render_chat(&chat)?,
            PromptSource::Text(t) => t,
        };
        backend.tokenize(&text)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            flavor,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("prompt preparation failed: {e}"),
        )
    })?
    .map_err(|e| backend_error(flavor, e))?;

    let info = state.backend.info();
    let ctx = info.context_length;
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            flavor,
            "the prompt is empty after tokenization",
        ));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::bad_request(
            flavor,
            format!(
                "the prompt is {} tokens long; this model's context is {ctx} tokens, which leaves no room to generate",
                prompt.len()
            ),
        )
        .param("messages")
        .code("context_length_exceeded"));
    }
    let params = resolve(flavor, &sampling, info.defaults, ctx - prompt.len())?;
    Ok(Prepared {
        prompt,
        params,
        tools,
    })
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
    if s.stop.len() > 16 {
        return Err(bad(
            "stop",
            format!(
                "at most 16 stop sequences are allowed, got {}",
                s.stop.len()
            ),
        ));
    }
    let stop = s.stop.iter().filter(|x| !x.is_empty()).cloned().collect();
    Ok(GenParams {
        temperature,
        top_p,
        top_k,
        seed: s.seed,
        max_tokens,
        stop,
        ignore_eos: s.ignore_eos,
    })
}

pub fn backend_error(flavor: Flavor, e: BackendError) -> ApiError {
    match e {
        BackendError::Invalid(m) => ApiError::bad_request(flavor, m),
        BackendError::Internal(m) => ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// Submits to the queue; a full queue is a 429.
pub fn start(state: &Arc<AppState>, flavor: Flavor, p: Prepared) -> Result<Generation, ApiError> {
    let rx = state.worker.submit(p.prompt, p.params).map_err(|_| {
        ApiError::new(
            flavor,
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy: the request queue is full; retry later",
        )
    })?;
    Ok(Generation {
        rx,
        parser: p.tools.map(ToolCallParser::new),
        pending: VecDeque::new(),
        done: false,
    })
}

/// What a generation produces, in order.
#[derive(Debug)]
pub enum Out {
    Text(String),
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
    },
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
    parser: Option<ToolCallParser>,
    pending: VecDeque<Out>,
    done: bool,
}

impl Generation {
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
                Some(Event::Delta(text)) => match &mut self.parser {
                    None => self.pending.push_back(Out::Text(text)),
                    Some(p) => {
                        let evs = p.push(&text);
                        self.pending.extend(evs.into_iter().map(to_out));
                    }
                },
                Some(Event::Done(result)) => {
                    self.done = true;
                    let tool_calls = match &mut self.parser {
                        None => 0,
                        Some(p) => {
                            let evs = p.finish();
                            self.pending.extend(evs.into_iter().map(to_out));
                            p.calls()
                        }
                    };
                    self.pending.push_back(match result {
                        Ok(completion) => Out::Finished {
                            completion,
                            tool_calls,
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

fn to_out(e: ToolEvent) -> Out {
    match e {
        ToolEvent::Text(t) => Out::Text(t),
        ToolEvent::CallStart { index, name } => Out::ToolStart { index, name },
        ToolEvent::ArgsDelta { index, json } => Out::ToolArgs { index, json },
        ToolEvent::CallEnd { index } => Out::ToolEnd { index },
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
