//! Anthropic's `/v1/messages`.
//!
//! Requests map onto the same template messages as OpenAI's: `system` becomes
//! a leading system message, `tool_use` blocks become assistant
//! `tool_calls`, `tool_result` blocks become `tool` messages. The stream is
//! Anthropic's event sequence: `message_start`, `ping`, then per content
//! block `content_block_start` / `content_block_delta`s (`text_delta` or
//! `input_json_delta`) / `content_block_stop`, then `message_delta` (with
//! `stop_reason` and output usage) and `message_stop`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::backend::{ChatPrompt, Completion, Finish};
use super::error::{parse_body, ApiError, Flavor};
use super::openai::sse_response;
use super::pipeline::{self, new_id, Out, PromptSource, SamplingRequest};
use super::{toolchoice, AppState};

const F: Flavor = Flavor::Anthropic;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block; only the fields the server uses are read.
#[derive(Deserialize)]
pub struct Block {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub tool_use_id: Option<String>,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub is_error: Option<bool>,
    #[serde(default)]
    pub thinking: Option<String>,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
}

#[derive(Deserialize)]
pub struct MessagesRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Option<Content>,
    /// Required by `/v1/messages` (the SDKs always send it); absent in
    /// `count_tokens`. Larger than the context is clamped to what is left.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    /// `{"type": "enabled", "budget_tokens": N}`, `adaptive` or `disabled`.
    #[serde(default)]
    pub thinking: Option<Value>,
    /// Claude Code's `clear_thinking_*` edits.
    #[serde(default)]
    pub context_management: Option<Value>,
    /// `{"effort": "low" | "medium" | "high" | "max"}`.
    #[serde(default)]
    pub output_config: Option<Value>,
}

/// Checks the fields agent clients send that change nothing here, so that
/// they are accepted for what they are and anything else is refused by name:
/// * `thinking`: the shape is validated; `disabled` (and `enabled`) reach
///   the template as `enable_thinking`, `adaptive` leaves the template's
///   default; what the model reasons comes back as `thinking` blocks,
///   never as text.
/// * `context_management`: only `clear_thinking_*` edits, which hold: the
///   model's template decides which earlier thinking reaches the prompt
///   (most keep only the current turn's).
/// * `output_config.effort`: one generation path, whatever the effort.
///   `output_config.format` (structured output, `{"type": "json_schema",
///   "schema"}`) is enforced by a grammar (`constraint::ResponseFormat`).
fn check_agent_fields(req: &MessagesRequest) -> Result<(), ApiError> {
    let bad = |msg: String| Err(ApiError::bad_request(F, msg));
    if let Some(t) = &req.thinking {
        match t.get("type").and_then(Value::as_str) {
            Some("adaptive" | "disabled") => {}
            Some("enabled") => {
                let budget = t.get("budget_tokens").and_then(Value::as_u64);
                if budget.is_none_or(|b| b < 1) {
                    return bad(format!("thinking.budget_tokens: a positive integer is required with `enabled`, got {}", t.get("budget_tokens").unwrap_or(&Value::Null)));
                }
            }
            _ => {
                return bad(format!(
                    "thinking.type: expected one of enabled, adaptive, disabled, got {}",
                    t.get("type").unwrap_or(&Value::Null)
                ))
            }
        }
    }
    if let Some(cm) = &req.context_management {
        let edits = cm.get("edits").and_then(Value::as_array);
        for (i, e) in edits.into_iter().flatten().enumerate() {
            let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
            if !kind.starts_with("clear_thinking_") {
                return bad(format!("context_management.edits.{i}.type: `{kind}` is not supported; only clear_thinking_* edits are (this server keeps no thinking blocks)"));
            }
        }
    }
    if let Some(oc) = &req.output_config {
        let Some(obj) = oc.as_object() else {
            return bad("output_config: expected an object".into());
        };
        for (k, v) in obj {
            match k.as_str() {
                "effort" if v.is_string() => {}
                "format" => {}
                "effort" => {
                    return bad(format!("output_config.effort: expected a string, got {v}"))
                }
                other => {
                    return bad(format!(
                        "output_config.{other}: not supported by this server"
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Text of a string or of a list of blocks (non-text blocks refused).
fn plain_text(c: Content, at: &str) -> Result<String, ApiError> {
    match c {
        Content::Text(s) => Ok(s),
        Content::Blocks(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.into_iter().enumerate() {
                match (b.kind.as_str(), b.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            F,
                            format!("{at}[{j}]: blocks of type `{kind}` are not supported here; send `text` blocks"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Anthropic messages in the template's shape (see [`ChatPrompt`]).
pub fn to_template_messages(
    system: Option<Content>,
    messages: Vec<Message>,
) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            F,
            "messages: at least one message is required",
        ));
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(sys) = system {
        let text = plain_text(sys, "system")?;
        if !text.is_empty() {
            out.push(json!({"role": "system", "content": text}));
        }
    }
    for (i, m) in messages.into_iter().enumerate() {
        if m.role == "system" {
            // Mid-conversation system messages (Claude Code's); folded by
            // `pipeline::fold_system_messages`.
            let text = plain_text(m.content, &format!("messages.{i}.content"))?;
            out.push(json!({"role": "system", "content": text}));
            continue;
        }
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::bad_request(
                F,
                format!(
                    "messages.{i}.role: `{}` is not one of user, assistant, system",
                    m.role
                ),
            ));
        }
        let blocks = match m.content {
            Content::Text(s) => {
                out.push(json!({"role": m.role, "content": s}));
                continue;
            }
            Content::Blocks(b) => b,
        };
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.into_iter().enumerate() {
            match b.kind.as_str() {
                "text" => text.push_str(b.text.as_deref().unwrap_or("")),
                // The turn's reasoning goes back to the template, which
                // keeps or drops it as the model was trained (GLM-4.7 and
                // MiniMax-M2 keep it in agent loops).
                "thinking" if m.role == "assistant" => {
                    reasoning.push_str(b.thinking.as_deref().unwrap_or(""))
                }
                "tool_use" if m.role == "assistant" => {
                    let name = b.name.ok_or_else(|| {
                        ApiError::bad_request(F, format!("messages.{i}.content.{j}.name: required for tool_use"))
                    })?;
                    calls.push(json!({
                        "id": b.id.unwrap_or_default(), "type": "function",
                        "function": {"name": name, "arguments": b.input.unwrap_or_else(|| json!({}))},
                    }));
                }
                "tool_result" if m.role == "user" => {
                    let mut content = match b.content {
                        None => String::new(),
                        Some(c) => plain_text(c, &format!("messages.{i}.content.{j}.content"))?,
                    };
                    if b.is_error == Some(true) {
                        content = format!("Error: {content}");
                    }
                    out.push(json!({
                        "role": "tool", "content": content, "tool_call_id": b.tool_use_id.unwrap_or_default(),
                    }));
                }
                // Encrypted reasoning of another model: nothing to render.
                "thinking" | "redacted_thinking" => {}
                other => {
                    return Err(ApiError::bad_request(
                        F,
                        format!("messages.{i}.content.{j}.type: `{other}` blocks are not supported in {} messages", m.role),
                    ))
                }
            }
        }
        if m.role == "assistant" {
            let mut msg = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            if !reasoning.is_empty() {
                msg["reasoning_content"] = Value::String(reasoning);
            }
            out.push(msg);
        } else if !text.is_empty() {
            out.push(json!({"role": "user", "content": text}));
        }
    }
    Ok(pipeline::fold_system_messages(out))
}

/// Splits off a trailing assistant message without tool calls: Anthropic's
/// prefill, the start of the reply that the model is to continue.
pub fn take_prefill(messages: &mut Vec<Value>) -> String {
    let is_prefill = messages.last().is_some_and(|m| {
        m["role"] == "assistant" && m.get("tool_calls").is_none() && messages.len() > 1
    });
    if !is_prefill {
        return String::new();
    }
    messages
        .pop()
        .and_then(|m| m["content"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Anthropic tools in the OpenAI shape chat templates expect.
pub fn to_openai_tools(tools: Vec<Tool>) -> Vec<Value> {
    tools
        .into_iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name,
                "description": t.description.unwrap_or_default(),
                "parameters": t.input_schema.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            }})
        })
        .collect()
}

fn stop_reason(c: &Completion, tool_calls: usize) -> (&'static str, Value) {
    match &c.finish {
        Finish::Length => ("max_tokens", Value::Null),
        Finish::Stop(s) => ("stop_sequence", Value::String(s.clone())),
        _ if tool_calls > 0 => ("tool_use", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// The parts of a request both `/v1/messages` and `count_tokens` build.
fn chat_source(req: &mut MessagesRequest) -> Result<PromptSource, ApiError> {
    check_agent_fields(req)?;
    let tools = to_openai_tools(req.tools.take().unwrap_or_default());
    let choice = toolchoice::from_anthropic(req.tool_choice.as_ref(), &tools)?;
    let mut messages = to_template_messages(req.system.take(), std::mem::take(&mut req.messages))?;
    let prefill = take_prefill(&mut messages);
    // `disabled` turns the template's reasoning off; `enabled` (with a
    // budget) and `adaptive` leave it to the template's default.
    let enable_thinking = match req.thinking.as_ref().and_then(|t| t.get("type")) {
        Some(t) if t == "disabled" => Some(false),
        Some(t) if t == "enabled" => Some(true),
        _ => None,
    };
    Ok(PromptSource::Chat(
        ChatPrompt {
            messages,
            tools,
            prefill,
            enable_thinking,
        },
        choice,
    ))
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        ApiError::new(
            F,
            e.status(),
            format!("could not read the request body: {e}"),
        )
    })
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: MessagesRequest = parse_body(F, &read_body(body)?)?;
    let Some(max_tokens) = req.max_tokens else {
        return Err(ApiError::bad_request(F, "max_tokens: field required").param("max_tokens"));
    };
    let source = chat_source(&mut req)?;
    let sampling = SamplingRequest {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: None,
        max_tokens: Some(max_tokens),
        stop: req.stop_sequences.take().unwrap_or_default(),
        ignore_eos: false,
        penalties: Default::default(),
        logprobs: None,
        response_format: super::constraint::ResponseFormat::parse(
            req.output_config.as_ref().and_then(|oc| oc.get("format")),
            F,
            "output_config.format",
        )?,
    };
    let prepared = pipeline::prepare(&state, F, source, sampling).await?;
    let input_tokens = prepared.prompt.len();
    let gen = pipeline::start(&state, F, prepared)?;
    let ctx = Ctx {
        id: new_id("msg_"),
        model: req
            .model
            .take()
            .unwrap_or_else(|| state.backend.info().id.clone()),
        input_tokens,
    };
    if req.stream.unwrap_or(false) {
        Ok(sse_response(stream(gen, ctx)))
    } else {
        collect(gen, ctx).await
    }
}

/// `/v1/messages/count_tokens`: the prompt tokens the same request to
/// `/v1/messages` would have (template, tools and prefill included).
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: MessagesRequest = parse_body(F, &read_body(body)?)?;
    let source = chat_source(&mut req)?;
    let rendered = pipeline::render(&state, F, source).await?;
    Ok(Json(json!({"input_tokens": rendered.prompt.len()})).into_response())
}

/// Anthropic's usage: `input_tokens` are the prompt tokens that were not
/// read from the cache (those are `cache_read_input_tokens`), so the two add
/// up to the prompt, never count a token twice.
#[cfg(test)]
pub(crate) fn usage_for_tests(c: &Completion) -> Value {
    usage(c)
}

fn usage(c: &Completion) -> Value {
    json!({
        "input_tokens": c.prompt_tokens - c.cached_prompt_tokens.min(c.prompt_tokens),
        "output_tokens": c.completion_tokens,
        "cache_read_input_tokens": c.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
    })
}

struct Ctx {
    id: String,
    model: String,
    input_tokens: usize,
}

async fn collect(mut gen: pipeline::Generation, ctx: Ctx) -> Result<Response, ApiError> {
    let mut content: Vec<Value> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    while let Some(ev) = gen.next().await {
        match ev {
            Out::Text(t) => match content.last_mut() {
                Some(b) if b["type"] == "text" => {
                    if let Some(Value::String(s)) = b.get_mut("text") {
                        s.push_str(&t)
                    }
                }
                _ => content.push(json!({"type": "text", "text": t})),
            },
            // The signature is Anthropic's proof that it wrote the
            // thinking; there is nothing to prove here, and clients send
            // the block back as it came.
            Out::Reasoning(t) => match content.last_mut() {
                Some(b) if b["type"] == "thinking" => {
                    if let Some(Value::String(s)) = b.get_mut("thinking") {
                        s.push_str(&t)
                    }
                }
                _ => content.push(json!({"type": "thinking", "thinking": t, "signature": ""})),
            },
            Out::ToolStart { name, .. } => {
                content.push(
                    json!({"type": "tool_use", "id": new_id("toolu_"), "name": name, "input": {}}),
                );
                args.push(String::new());
            }
            Out::ToolArgs { json, .. } => {
                if let Some(a) = args.last_mut() {
                    a.push_str(&json)
                }
            }
            Out::ToolEnd { .. } => {
                let parsed = args
                    .last()
                    .and_then(|a| serde_json::from_str::<Value>(a).ok())
                    .unwrap_or_else(|| json!({}));
                if let Some(b) = content.last_mut() {
                    b["input"] = parsed;
                }
            }
            // Anthropic's API has no log-probabilities; never asked for.
            Out::Logprob(_) => {}
            Out::Failed(e) => return Err(pipeline::backend_error(F, e)),
            Out::Finished {
                completion,
                tool_calls,
            } => {
                let (reason, seq) = stop_reason(&completion, tool_calls);
                let body = json!({
                    "id": ctx.id, "type": "message", "role": "assistant", "model": ctx.model,
                    "content": content, "stop_reason": reason, "stop_sequence": seq,
                    "usage": usage(&completion),
                });
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::new(
        F,
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result",
    ))
}

fn event(name: &str, v: &Value) -> String {
    format!("event: {name}\ndata: {v}\n\n")
}

fn stream(
    gen: pipeline::Generation,
    ctx: Ctx,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct St {
        gen: pipeline::Generation,
        ctx: Ctx,
        started: bool,
        finished: bool,
        /// Index of the next content block.
        blocks: usize,
        /// The kind of the open block.
        open: Option<Open>,
    }
    let st = St {
        gen,
        ctx,
        started: false,
        finished: false,
        blocks: 0,
        open: None,
    };
    #[derive(Clone, Copy, PartialEq)]
    enum Open {
        Text,
        Thinking,
        Tool,
    }
    futures::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        if !st.started {
            st.started = true;
            let start = json!({"type": "message_start", "message": {
                "id": st.ctx.id, "type": "message", "role": "assistant", "model": st.ctx.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                // What is read from the cache is known at the end: the
                // final split comes with `message_delta`.
                "usage": {"input_tokens": st.ctx.input_tokens, "output_tokens": 0,
                    "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            }});
            let s = event("message_start", &start) + &event("ping", &json!({"type": "ping"}));
            return Some((Ok(Bytes::from(s)), st));
        }
        let mut s = String::new();
        // Closes the open block, if any.
        let close = |st: &mut St, s: &mut String| {
            if let Some(open) = st.open.take() {
                let i = st.blocks - 1;
                if open == Open::Thinking {
                    // Anthropic ends a thinking block with its signature.
                    s.push_str(&event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": i,
                            "delta": {"type": "signature_delta", "signature": ""}}),
                    ));
                }
                s.push_str(&event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": i}),
                ));
            }
        };
        // One generator event per stream item.
        match st.gen.next().await {
            None => {
                st.finished = true;
            }
            Some(Out::Reasoning(t)) => {
                if st.open != Some(Open::Thinking) {
                    close(&mut st, &mut s);
                    let start = json!({"type": "content_block_start", "index": st.blocks,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""}});
                    s.push_str(&event("content_block_start", &start));
                    st.blocks += 1;
                    st.open = Some(Open::Thinking);
                }
                let delta = json!({"type": "content_block_delta", "index": st.blocks - 1,
                    "delta": {"type": "thinking_delta", "thinking": t}});
                s.push_str(&event("content_block_delta", &delta));
            }
            Some(Out::Text(t)) => {
                if st.open != Some(Open::Text) {
                    close(&mut st, &mut s);
                    let start = json!({"type": "content_block_start", "index": st.blocks,
                        "content_block": {"type": "text", "text": ""}});
                    s.push_str(&event("content_block_start", &start));
                    st.blocks += 1;
                    st.open = Some(Open::Text);
                }
                let delta = json!({"type": "content_block_delta", "index": st.blocks - 1,
                    "delta": {"type": "text_delta", "text": t}});
                s.push_str(&event("content_block_delta", &delta));
            }
            Some(Out::ToolStart { name, .. }) => {
                close(&mut st, &mut s);
                let start = json!({"type": "content_block_start", "index": st.blocks,
                    "content_block": {"type": "tool_use", "id": new_id("toolu_"), "name": name, "input": {}}});
                s.push_str(&event("content_block_start", &start));
                st.blocks += 1;
                st.open = Some(Open::Tool);
            }
            Some(Out::ToolArgs { json, .. }) => {
                let delta = json!({"type": "content_block_delta", "index": st.blocks - 1,
                    "delta": {"type": "input_json_delta", "partial_json": json}});
                s.push_str(&event("content_block_delta", &delta));
            }
            Some(Out::ToolEnd { .. }) => {
                close(&mut st, &mut s);
            }
            Some(Out::Logprob(_)) => {}
            Some(Out::Failed(e)) => {
                st.finished = true;
                s.push_str(&event("error", &pipeline::backend_error(F, e).body()));
            }
            Some(Out::Finished {
                completion,
                tool_calls,
            }) => {
                st.finished = true;
                close(&mut st, &mut s);
                if st.blocks == 0 {
                    // Anthropic always answers with at least one block.
                    let start = json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}});
                    s.push_str(&event("content_block_start", &start));
                    s.push_str(&event(
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": 0}),
                    ));
                }
                let (reason, seq) = stop_reason(&completion, tool_calls);
                let delta = json!({"type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": seq},
                    "usage": usage(&completion)});
                s.push_str(&event("message_delta", &delta));
                s.push_str(&event("message_stop", &json!({"type": "message_stop"})));
            }
        }
        Some((Ok(Bytes::from(s)), st))
    })
}
