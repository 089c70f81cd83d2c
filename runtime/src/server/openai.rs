//! OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`.
//!
//! Streaming follows OpenAI: `data: {chunk}\n\n` lines of
//! `chat.completion.chunk` objects, the first carrying the role, tool calls
//! as `delta.tool_calls[i]` (id, type and name first, then argument
//! fragments), a last chunk with `finish_reason`, an optional usage chunk
//! (`stream_options.include_usage`) and `data: [DONE]`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::backend::{ChatPrompt, Completion, Finish, Logprob};
use super::error::{parse_body, ApiError, Flavor};
use super::fields::SamplerFields;
use super::pipeline::{self, new_id, unix_now, Out, PromptSource};
use super::{toolchoice, AppState};

const F: Flavor = Flavor::OpenAi;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's reasoning, as this server (and vLLM, DeepSeek's
    /// API) returns it; `reasoning` is the newer spelling some clients use.
    #[serde(default, alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

#[derive(Deserialize)]
pub struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    pub function: FunctionIn,
}

#[derive(Deserialize)]
pub struct FunctionIn {
    pub name: String,
    /// A JSON string per OpenAI; an object is accepted too.
    #[serde(default)]
    pub arguments: Option<Value>,
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat completions request without its sampler fields, which
/// [`SamplerFields`] reads from the same body.
#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

/// A completions request without its sampler fields (see [`ChatRequest`]).
#[derive(Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptIn,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
}

fn content_text(c: Option<Content>, at: usize) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            F,
                            format!("messages[{at}].content[{j}]: content parts of type `{kind}` are not supported by this text-only model; send `text` parts"),
                        )
                        .param(format!("messages[{at}].content[{j}].type")))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Turns a tool call's `arguments` (a JSON string) into the object chat
/// templates iterate over; text that is not a JSON object is kept as is.
fn arguments_object(args: Option<Value>) -> Value {
    match args {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ Value::Object(_)) => v,
            // `""` and `"null"` (clients' "no arguments") break templates
            // that iterate over the arguments (Qwen3-Coder's).
            Ok(Value::Null) => json!({}),
            _ if s.trim().is_empty() => json!({}),
            _ => Value::String(s),
        },
        Some(v) => v,
    }
}

/// OpenAI messages in the template's shape (see [`ChatPrompt`]).
pub fn to_template_messages(messages: Vec<Message>) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(
            ApiError::bad_request(F, "`messages` must hold at least one message").param("messages"),
        );
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => "tool",
            other => {
                return Err(ApiError::bad_request(
                    F,
                    format!("messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"),
                )
                .param(format!("messages[{i}].role")))
            }
        };
        let content = content_text(m.content, i)?;
        let mut msg = json!({"role": role, "content": content});
        if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|c| {
                    json!({
                        "id": c.id.unwrap_or_default(),
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": arguments_object(c.function.arguments)},
                    })
                })
                .collect();
            msg["tool_calls"] = Value::Array(calls);
        }
        if let Some(id) = m.tool_call_id {
            msg["tool_call_id"] = Value::String(id);
        }
        if let Some(name) = m.name {
            msg["name"] = Value::String(name);
        }
        if let Some(r) = m
            .reasoning_content
            .filter(|r| !r.is_empty() && role == "assistant")
        {
            msg["reasoning_content"] = Value::String(r);
        }
        out.push(msg);
    }
    Ok(out)
}

fn check_n(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::bad_request(
            F,
            format!("n = {n} is not supported; this server returns one choice"),
        )
        .param("n")),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        ApiError::new(
            F,
            e.status(),
            format!("could not read the request body: {e}"),
        )
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let req: ChatRequest = parse_body(F, &body)?;
    let fields = SamplerFields::parse(&body)?;
    check_n(req.n)?;
    let logprobs = fields.chat_logprobs()?;
    let sampling = fields.into_request(req.max_completion_tokens.or(req.max_tokens), logprobs)?;
    let tools = req.tools.unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str);
        if name.is_none() {
            return Err(
                ApiError::bad_request(F, format!("tools[{i}] needs `function.name`"))
                    .param(format!("tools[{i}]")),
            );
        }
    }
    let choice =
        toolchoice::from_openai(req.tool_choice.as_ref(), req.parallel_tool_calls, &tools)?;
    let messages = to_template_messages(req.messages)?;
    let prepared = pipeline::prepare(
        &state,
        F,
        PromptSource::Chat(
            ChatPrompt {
                messages,
                tools,
                prefill: String::new(),
                enable_thinking: None,
            },
            choice,
        ),
        sampling,
    )
    .await?;
    let prompt_tokens = prepared.prompt.len();
    let gen = pipeline::start(&state, F, prepared)?;
    let model = state.backend.info().id.clone();
    let ctx = ResponseCtx {
        id: new_id("chatcmpl-"),
        created: unix_now(),
        model,
        prompt_tokens,
        logprobs: logprobs.is_some(),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        Ok(sse_response(chat_stream(gen, ctx, include_usage)))
    } else {
        chat_collect(gen, ctx).await
    }
}

struct ResponseCtx {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    /// The request asked for log-probabilities.
    logprobs: bool,
}

/// One token in chat's `logprobs.content` shape.
fn chat_logprob(lp: &Logprob) -> Value {
    let entry = |t: &str, l: f32| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
    let mut e = entry(&lp.token, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|(t, l)| entry(t, *l)).collect();
    e
}

/// Tokens in the legacy completions `logprobs` shape; `offset` is the
/// text offset (in characters) of the first one, advanced past them.
fn completion_logprobs(lps: &[Logprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(lps.len());
    for lp in lps {
        text_offset.push(*offset);
        *offset += lp.token.chars().count();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, v)| (t.clone(), json!(v))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

fn finish_reason(c: &Completion, tool_calls: usize) -> &'static str {
    match c.finish {
        Finish::Length => "length",
        _ if tool_calls > 0 => "tool_calls",
        _ => "stop",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_prompt_tokens},
    })
}

async fn chat_collect(
    mut gen: pipeline::Generation,
    ctx: ResponseCtx,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls: Vec<Value> = Vec::new();
    let mut logprobs: Vec<Value> = Vec::new();
    while let Some(ev) = gen.next().await {
        match ev {
            Out::Logprob(lp) => logprobs.push(chat_logprob(&lp)),
            Out::Text(t) => text.push_str(&t),
            Out::Reasoning(t) => reasoning.push_str(&t),
            Out::ToolStart { name, .. } => calls.push(json!({
                "id": new_id("call_"), "type": "function", "function": {"name": name, "arguments": ""}
            })),
            Out::ToolArgs { index, json } => {
                if let Some(Value::String(a)) = calls.get_mut(index).and_then(|c| c.pointer_mut("/function/arguments")) {
                    a.push_str(&json);
                }
            }
            Out::ToolEnd { .. } => {}
            Out::Failed(e) => return Err(pipeline::backend_error(F, e)),
            Out::Finished { completion, tool_calls } => {
                let mut message = json!({"role": "assistant", "content": text});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = Value::String(std::mem::take(&mut reasoning));
                }
                if !calls.is_empty() {
                    if text.trim().is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = Value::Array(std::mem::take(&mut calls));
                }
                let body = json!({
                    "id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
                    "choices": [{
                        "index": 0, "message": message,
                        "logprobs": if ctx.logprobs {
                            json!({"content": std::mem::take(&mut logprobs), "refusal": null})
                        } else {
                            Value::Null
                        },
                        "finish_reason": finish_reason(&completion, tool_calls),
                    }],
                    "usage": usage(&completion),
                    "system_fingerprint": null,
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

fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The chat SSE stream as a byte stream; dropping it cancels the generation.
fn chat_stream(
    gen: pipeline::Generation,
    ctx: ResponseCtx,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct St {
        gen: pipeline::Generation,
        ctx: ResponseCtx,
        include_usage: bool,
        started: bool,
        finished: bool,
        call_ids: Vec<String>,
        /// Log-probabilities not yet sent: they ride on the next chunk.
        logprobs: Vec<Value>,
    }
    let st = St {
        gen,
        ctx,
        include_usage,
        started: false,
        finished: false,
        call_ids: Vec::new(),
        logprobs: Vec::new(),
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let chunk = |st: &mut St, delta: Value, finish: Value| {
            let logprobs = if st.ctx.logprobs && !st.logprobs.is_empty() {
                json!({"content": std::mem::take(&mut st.logprobs), "refusal": null})
            } else {
                Value::Null
            };
            json!({
                "id": st.ctx.id, "object": "chat.completion.chunk", "created": st.ctx.created,
                "model": st.ctx.model, "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        };
        if !st.started {
            st.started = true;
            let first = chunk(
                &mut st,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            );
            return Some((Ok(data(&first)), st));
        }
        let out = loop {
            match st.gen.next().await {
                None => {
                    st.finished = true;
                    break Bytes::from_static(b"data: [DONE]\n\n");
                }
                Some(Out::Logprob(lp)) => st.logprobs.push(chat_logprob(&lp)),
                Some(Out::Text(t)) => {
                    break data(&chunk(&mut st, json!({"content": t}), Value::Null))
                }
                Some(Out::Reasoning(t)) => {
                    break data(&chunk(
                        &mut st,
                        json!({"reasoning_content": t}),
                        Value::Null,
                    ))
                }
                Some(Out::ToolStart { index, name }) => {
                    let id = new_id("call_");
                    st.call_ids.push(id.clone());
                    let delta = json!({"tool_calls": [{
                        "index": index, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }]});
                    break data(&chunk(&mut st, delta, Value::Null));
                }
                Some(Out::ToolArgs { index, json }) => {
                    let delta =
                        json!({"tool_calls": [{"index": index, "function": {"arguments": json}}]});
                    break data(&chunk(&mut st, delta, Value::Null));
                }
                Some(Out::ToolEnd { .. }) => continue,
                Some(Out::Failed(e)) => {
                    st.finished = true;
                    let err = pipeline::backend_error(F, e).body();
                    break Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n"));
                }
                Some(Out::Finished {
                    completion,
                    tool_calls,
                }) => {
                    let last = chunk(
                        &mut st,
                        json!({}),
                        json!(finish_reason(&completion, tool_calls)),
                    );
                    let mut s = format!("data: {last}\n\n");
                    if st.include_usage {
                        let u = json!({
                            "id": st.ctx.id, "object": "chat.completion.chunk", "created": st.ctx.created,
                            "model": st.ctx.model, "choices": [], "usage": usage(&completion),
                        });
                        s.push_str(&format!("data: {u}\n\n"));
                    }
                    break Bytes::from(s);
                }
            }
        };
        Some((Ok(out), st))
    })
}

pub fn sse_response<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let req: CompletionRequest = parse_body(F, &body)?;
    let fields = SamplerFields::parse(&body)?;
    check_n(req.n)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(
            ApiError::bad_request(F, "suffix (insertion) is not supported").param("suffix"),
        );
    }
    if req.echo.unwrap_or(false) {
        return Err(ApiError::bad_request(F, "echo is not supported").param("echo"));
    }
    let logprobs = fields.completion_logprobs()?;
    // OpenAI's legacy default is 16 tokens.
    let sampling = fields.into_request(Some(req.max_tokens.unwrap_or(16)), logprobs)?;
    let prompt = match req.prompt {
        PromptIn::One(s) => s,
        PromptIn::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptIn::Many(v) => {
            return Err(ApiError::bad_request(
                F,
                format!("one prompt per request is supported, got {}", v.len()),
            )
            .param("prompt"))
        }
    };
    let prepared = pipeline::prepare(&state, F, PromptSource::Text(prompt), sampling).await?;
    let prompt_tokens = prepared.prompt.len();
    let mut gen = pipeline::start(&state, F, prepared)?;
    let ctx = ResponseCtx {
        id: new_id("cmpl-"),
        created: unix_now(),
        model: state.backend.info().id.clone(),
        prompt_tokens,
        logprobs: logprobs.is_some(),
    };
    // `lps`: the tokens since the last chunk; `offset` the text offset.
    let chunk = move |ctx: &ResponseCtx,
                      text: &str,
                      finish: Value,
                      lps: &mut Vec<Logprob>,
                      offset: &mut usize| {
        let logprobs = if ctx.logprobs {
            let v = completion_logprobs(lps, offset);
            lps.clear();
            v
        } else {
            Value::Null
        };
        json!({
            "id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        })
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        struct St {
            gen: pipeline::Generation,
            ctx: ResponseCtx,
            done: bool,
            lps: Vec<Logprob>,
            offset: usize,
        }
        let st = St {
            gen,
            ctx,
            done: false,
            lps: Vec::new(),
            offset: 0,
        };
        let stream = futures::stream::unfold(st, move |mut st| async move {
            if st.done {
                return None;
            }
            let out = loop {
                match st.gen.next().await {
                    None => return None,
                    Some(Out::Logprob(lp)) => st.lps.push(lp),
                    Some(Out::Text(t)) => {
                        break data(&chunk(
                            &st.ctx,
                            &t,
                            Value::Null,
                            &mut st.lps,
                            &mut st.offset,
                        ))
                    }
                    Some(Out::Failed(e)) => {
                        st.done = true;
                        let err = pipeline::backend_error(F, e).body();
                        break Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n"));
                    }
                    Some(Out::Finished { completion, .. }) => {
                        st.done = true;
                        let finish = json!(finish_reason(&completion, 0));
                        let mut last = chunk(&st.ctx, "", finish, &mut st.lps, &mut st.offset);
                        if include_usage {
                            last["usage"] = usage(&completion);
                        }
                        break Bytes::from(format!("data: {last}\n\ndata: [DONE]\n\n"));
                    }
                    Some(_) => continue,
                }
            };
            Some((Ok(out), st))
        });
        return Ok(sse_response(stream));
    }
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = gen.next().await {
        match ev {
            Out::Logprob(lp) => lps.push(lp),
            Out::Text(t) => text.push_str(&t),
            Out::Failed(e) => return Err(pipeline::backend_error(F, e)),
            Out::Finished { completion, .. } => {
                let finish = json!(finish_reason(&completion, 0));
                let mut body = chunk(&ctx, &text, finish, &mut lps, &mut 0);
                body["usage"] = usage(&completion);
                let _ = ctx.prompt_tokens;
                return Ok(Json(body).into_response());
            }
            _ => {}
        }
    }
    Err(ApiError::new(
        F,
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result",
    ))
}

/// The model list entry in OpenAI's shape, or Anthropic's when the request
/// carries `anthropic-version` (the Anthropic SDK's `models.list/retrieve`).
fn model_entry(state: &AppState, anthropic: bool) -> Value {
    let info = state.backend.info();
    if anthropic {
        let created = rfc3339(state.started_at);
        json!({"type": "model", "id": info.id, "display_name": info.id, "created_at": created})
    } else {
        json!({
            "id": info.id, "object": "model", "created": state.started_at, "owned_by": "mfx",
            "context_length": info.context_length,
        })
    }
}

fn is_anthropic(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

pub async fn models(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let entry = model_entry(&state, is_anthropic(&headers));
    if is_anthropic(&headers) {
        let id = entry["id"].clone();
        return Json(json!({"data": [entry], "has_more": false, "first_id": id, "last_id": id}))
            .into_response();
    }
    Json(json!({"object": "list", "data": [entry]})).into_response()
}

/// `GET /v1/models/{id}`: the served model, or 404 for any other name.
pub async fn model(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let anthropic = is_anthropic(&headers);
    if id != state.backend.info().id {
        let flavor = if anthropic { Flavor::Anthropic } else { F };
        return Err(ApiError::new(
            flavor,
            StatusCode::NOT_FOUND,
            format!(
                "model `{id}` not found; this server serves `{}`",
                state.backend.info().id
            ),
        )
        .param("model")
        .code("model_not_found"));
    }
    Ok(Json(model_entry(&state, anthropic)).into_response())
}

/// Unix seconds as an RFC 3339 UTC time (Howard Hinnant's civil-from-days).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod date_tests {
    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_589_491), "2026-12-06T20:38:11Z");
    }
}
