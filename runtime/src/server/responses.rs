//! OpenAI's Responses API, `POST /v1/responses`, as Codex CLI speaks it.
//!
//! Input items map onto the same template messages as chat completions:
//! `instructions` and `developer`/`system` messages become system text
//! (folded as in [`pipeline::fold_system_messages`]), `function_call` items
//! assistant `tool_calls`, `function_call_output` items `tool` messages;
//! `reasoning` items the assistant turn's reasoning. Nothing is
//! stored: `previous_response_id` is refused, the client sends the whole
//! conversation (Codex does, with `store: false`).
//!
//! The stream is the Responses event sequence, each event with a
//! `sequence_number`: `response.created`, `response.in_progress`, then per
//! output item `response.output_item.added`, for a message
//! `response.content_part.added` / `response.output_text.delta`s /
//! `response.output_text.done` / `response.content_part.done`, for
//! reasoning `response.reasoning_text.delta`s / `.done`, for a call
//! `response.function_call_arguments.delta`s / `.done`, then
//! `response.output_item.done`; last `response.completed` (or
//! `response.incomplete` when `max_output_tokens` ran out) with the whole
//! response and its usage.

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
use super::fields::SamplerFields;
use super::openai::sse_response;
use super::pipeline::{self, new_id, unix_now, Out, PromptSource};
use super::{toolchoice, AppState};

const F: Flavor = Flavor::OpenAi;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    // `temperature`, `top_p` and (as vLLM's Responses API) the other
    // sampler fields are read by `fields::SamplerFields` from the same body.
    // Accepted, no effect on the output by their nature: `store` (nothing
    // is stored either way), `include`, `reasoning` (effort and summaries:
    // the model's template decides whether it reasons; what it reasons is
    // returned as `reasoning` items with `reasoning_text` content, no
    // summaries), `prompt_cache_key` (the KV prefix is
    // reused anyway), `client_metadata`, `user`, `service_tier`, `truncation`.
}

fn bad(msg: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::bad_request(F, msg).param(param)
}

/// Fields that would change the output and are not supported: refused by
/// name rather than ignored.
fn check_unsupported(req: &ResponsesRequest) -> Result<(), ApiError> {
    if req.previous_response_id.is_some() {
        return Err(bad(
            "previous_response_id is not supported: this server stores no responses; send the whole conversation in `input`",
            "previous_response_id",
        ));
    }
    if req.background == Some(true) {
        return Err(bad("background responses are not supported", "background"));
    }
    Ok(())
}

/// The text of a message's `content`: a string or a list of text parts.
fn content_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text" | "refusal", Some(t)) => out.push_str(t),
                    ("refusal", None) => {
                        out.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or(""))
                    }
                    _ => {
                        return Err(bad(
                            format!("{at}[{j}]: content parts of type `{kind}` are not supported by this text-only model"),
                            format!("{at}[{j}].type"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(bad(
            format!("{at}: expected a string or a list of content parts, got {other}"),
            at,
        )),
    }
}

/// Input items in the template's shape (see [`ChatPrompt`]).
pub fn to_template_messages(
    instructions: Option<String>,
    input: Input,
) -> Result<Vec<Value>, ApiError> {
    let mut out: Vec<Value> = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        out.push(json!({"role": "system", "content": i}));
    }
    let items = match input {
        Input::Text(s) => vec![json!({"type": "message", "role": "user", "content": s})],
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(bad("`input` must hold at least one item", "input"));
    }
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("input[{i}]");
        // Easy input messages have a role and no type.
        let kind =
            item.get("type")
                .and_then(Value::as_str)
                .unwrap_or(if item.get("role").is_some() {
                    "message"
                } else {
                    ""
                });
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("system" | "developer") => "system",
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    other => {
                        return Err(bad(
                            format!("{at}.role: `{}` is not one of system, developer, user, assistant", other.unwrap_or("")),
                            format!("{at}.role"),
                        ))
                    }
                };
                let text = content_text(item.get("content"), &format!("{at}.content"))?;
                match out.last_mut() {
                    // The answer after its reasoning item: one turn.
                    Some(last) if role == "assistant" && is_bare_reasoning(last) => {
                        last["content"] = Value::String(text)
                    }
                    _ => out.push(json!({"role": role, "content": text})),
                }
            }
            "function_call" => {
                let name = item.get("name").and_then(Value::as_str).ok_or_else(|| {
                    bad(format!("{at}.name: required for function_call"), format!("{at}.name"))
                })?;
                let args = match item.get("arguments") {
                    Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                        Ok(v @ Value::Object(_)) => v,
                        // "" or "null" (as some clients write for no arguments).
                        Ok(Value::Null) | Err(_) if s.trim().is_empty() || s.trim() == "null" => json!({}),
                        _ => Value::String(s.clone()),
                    },
                    Some(v @ Value::Object(_)) => v.clone(),
                    _ => json!({}),
                };
                let call = json!({
                    "id": item.get("call_id").and_then(Value::as_str).unwrap_or(""),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                });
                // Consecutive calls belong to one assistant turn.
                match out.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                            Some(calls) => calls.push(call),
                            None => last["tool_calls"] = json!([call]),
                        }
                    }
                    _ => out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other, &format!("{at}.output"))?,
                };
                out.push(json!({
                    "role": "tool", "content": output,
                    "tool_call_id": item.get("call_id").and_then(Value::as_str).unwrap_or(""),
                }));
            }
            // The reasoning of the assistant turn that follows: the template
            // keeps or drops it as the model was trained.
            "reasoning" => {
                let parts = item
                    .get("content")
                    .and_then(Value::as_array)
                    .filter(|c| !c.is_empty())
                    .or_else(|| item.get("summary").and_then(Value::as_array));
                let text: String = parts
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n\n");
                if !text.is_empty() {
                    out.push(json!({"role": "assistant", "content": "", "reasoning_content": text}));
                }
            }
            other => {
                return Err(bad(
                    format!("{at}.type: `{other}` items are not supported; send message, function_call, function_call_output or reasoning items"),
                    format!("{at}.type"),
                ))
            }
        }
    }
    // Reasoning that no answer or call followed renders as nothing.
    out.retain(|m| !is_bare_reasoning(m));
    Ok(pipeline::fold_system_messages(out))
}

/// An assistant message holding only reasoning (from a `reasoning` item).
fn is_bare_reasoning(m: &Value) -> bool {
    m["role"] == "assistant"
        && m.get("reasoning_content").is_some()
        && m.get("tool_calls").is_none()
        && m["content"].as_str().is_some_and(str::is_empty)
}

/// Responses tools in the chat-completions shape templates expect.
/// Function tools (also those grouped in a `namespace`) are offered to the
/// model; hosted tools this server cannot run (`web_search`, `file_search`,
/// ...) are not, so the model never calls them.
pub fn to_openai_tools(tools: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    fn add(out: &mut Vec<Value>, t: &Value, at: &str) -> Result<(), ApiError> {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                    bad(
                        format!("{at}.name: required for a function tool"),
                        format!("{at}.name"),
                    )
                })?;
                out.push(json!({"type": "function", "function": {
                    "name": name,
                    "description": t.get("description").cloned().unwrap_or(json!("")),
                    "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
                }}));
            }
            Some("namespace") => {
                for (j, inner) in t
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    add(out, inner, &format!("{at}.tools[{j}]"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    for (i, t) in tools.iter().enumerate() {
        add(&mut out, t, &format!("tools[{i}]"))?;
    }
    Ok(out)
}

/// Responses' `tool_choice` in the chat-completions form.
fn tool_choice(v: Option<Value>) -> Option<Value> {
    match v {
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            Some(
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}}),
            )
        }
        other => other,
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        ApiError::new(
            F,
            e.status(),
            format!("could not read the request body: {e}"),
        )
    })?;
    let req: ResponsesRequest = parse_body(F, &body)?;
    let fields = SamplerFields::parse(&body)?;
    check_unsupported(&req)?;
    fields.refuse_for_responses()?;
    let tools = to_openai_tools(req.tools.clone().unwrap_or_default())?;
    let choice_in = tool_choice(req.tool_choice.clone());
    let choice = toolchoice::from_openai(choice_in.as_ref(), req.parallel_tool_calls, &tools)?;
    let messages = to_template_messages(req.instructions.clone(), req.input)?;
    let (temperature, top_p) = (fields.temperature, fields.top_p);
    let mut sampling = fields.into_request(req.max_output_tokens, None)?;
    // `text.format`: json_object / json_schema, enforced by a grammar.
    let format = req.text.as_ref().and_then(|t| t.get("format"));
    sampling.response_format = super::constraint::ResponseFormat::parse(format, F, "text.format")?;
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
    .await
    .map_err(|e| rename_param(e, "max_tokens", "max_output_tokens"))?;
    let gen = pipeline::start(&state, F, prepared)?;
    let base = json!({
        "id": new_id("resp_"), "object": "response", "created_at": unix_now(),
        "model": req.model.unwrap_or_else(|| state.backend.info().id.clone()),
        "status": "in_progress", "error": null, "incomplete_details": null,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "output": [], "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": null, "store": false,
        "temperature": temperature, "top_p": top_p,
        "text": req.text.clone().filter(|t| t.get("format").is_some())
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": req.tool_choice.unwrap_or(json!("auto")),
        "tools": req.tools.unwrap_or_default(), "truncation": "disabled",
        "metadata": req.metadata.unwrap_or(json!({})), "usage": null,
    });
    if req.stream.unwrap_or(false) {
        Ok(sse_response(stream(gen, base)))
    } else {
        collect(gen, base).await
    }
}

fn rename_param(mut e: ApiError, from: &str, to: &str) -> ApiError {
    if e.param.as_deref() == Some(from) {
        e.param = Some(to.into());
        e.message = e.message.replace(from, to);
    }
    e
}

fn usage(c: &Completion) -> Value {
    json!({
        "input_tokens": c.prompt_tokens,
        "input_tokens_details": {"cached_tokens": c.cached_prompt_tokens},
        "output_tokens": c.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    })
}

/// The finished response: status, output items and usage filled in.
fn finish(mut base: Value, output: Vec<Value>, c: &Completion) -> Value {
    let incomplete = c.finish == Finish::Length;
    base["status"] = json!(if incomplete {
        "incomplete"
    } else {
        "completed"
    });
    if incomplete {
        base["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    base["output"] = Value::Array(output);
    base["usage"] = usage(c);
    base
}

/// An output item's status: `incomplete` for the one the token limit cut
/// off (a call whose arguments may miss required fields, a message cut
/// mid-sentence), as OpenAI reports it.
fn item_status(complete: bool) -> &'static str {
    if complete {
        "completed"
    } else {
        "incomplete"
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "reasoning", "id": id, "status": status, "summary": [],
        "content": [{"type": "reasoning_text", "text": text}]})
}

fn call_item(id: &str, call_id: &str, name: &str, args: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": args, "status": status})
}

/// Output items being built from the generation's events.
#[derive(Default)]
struct Builder {
    output: Vec<Value>,
    /// The open item: a message (its id and text) or a call (id, call id,
    /// name, arguments).
    open: Option<Open>,
}

enum Open {
    Text {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        args: String,
    },
}

impl Builder {
    fn close(&mut self) -> Option<Value> {
        self.close_as("completed")
    }

    /// Closes the open item with `status` (`incomplete`: a call the token
    /// limit cut off, whose arguments may miss required fields).
    fn close_as(&mut self, status: &str) -> Option<Value> {
        let item = match self.open.take()? {
            Open::Text { id, text } => message_item(&id, &text, status),
            Open::Reasoning { id, text } => reasoning_item(&id, &text, status),
            Open::Call {
                id,
                call_id,
                name,
                args,
            } => call_item(&id, &call_id, &name, &args, status),
        };
        self.output.push(item.clone());
        Some(item)
    }
}

async fn collect(mut gen: pipeline::Generation, base: Value) -> Result<Response, ApiError> {
    let mut b = Builder::default();
    while let Some(ev) = gen.next().await {
        match ev {
            Out::Text(t) => match &mut b.open {
                Some(Open::Text { text, .. }) => text.push_str(&t),
                _ => {
                    b.close();
                    b.open = Some(Open::Text {
                        id: new_id("msg_"),
                        text: t,
                    });
                }
            },
            Out::Reasoning(t) => match &mut b.open {
                Some(Open::Reasoning { text, .. }) => text.push_str(&t),
                _ => {
                    b.close();
                    b.open = Some(Open::Reasoning {
                        id: new_id("rs_"),
                        text: t,
                    });
                }
            },
            Out::ToolStart { name, .. } => {
                b.close();
                b.open = Some(Open::Call {
                    id: new_id("fc_"),
                    call_id: new_id("call_"),
                    name,
                    args: String::new(),
                });
            }
            Out::ToolArgs { json, .. } => {
                if let Some(Open::Call { args, .. }) = &mut b.open {
                    args.push_str(&json);
                }
            }
            Out::ToolEnd { complete, .. } => {
                b.close_as(item_status(complete));
            }
            // `top_logprobs` is refused here, so never asked for.
            Out::Logprob(_) => {}
            Out::Failed(e) => return Err(pipeline::backend_error(F, e)),
            Out::Finished { completion, .. } => {
                b.close_as(item_status(completion.finish != Finish::Length));
                let output = drop_blank_text(std::mem::take(&mut b.output));
                return Ok(Json(finish(base, output, &completion)).into_response());
            }
        }
    }
    Err(ApiError::new(
        F,
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result",
    ))
}

/// Whitespace between tool calls is not a message of its own.
fn drop_blank_text(items: Vec<Value>) -> Vec<Value> {
    let has_call = items.iter().any(|i| i["type"] == "function_call");
    items
        .into_iter()
        .filter(|i| {
            !(has_call
                && i["type"] == "message"
                && i.pointer("/content/0/text")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.trim().is_empty()))
        })
        .collect()
}

fn stream(
    gen: pipeline::Generation,
    base: Value,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct St {
        gen: pipeline::Generation,
        base: Value,
        seq: u64,
        started: bool,
        finished: bool,
        b: Builder,
    }
    impl St {
        fn event(&mut self, out: &mut String, mut v: Value) {
            let kind = v["type"].as_str().unwrap_or("").to_owned();
            v["sequence_number"] = json!(self.seq);
            self.seq += 1;
            out.push_str(&format!("event: {kind}\ndata: {v}\n\n"));
        }
        fn index(&self) -> usize {
            self.b.output.len()
        }
        /// Closes the open item with its `done` events.
        fn close(&mut self, out: &mut String) {
            self.close_as(out, "completed")
        }
        fn close_as(&mut self, out: &mut String, status: &str) {
            let index = self.index();
            let Some(item) = self.b.close_as(status) else {
                return;
            };
            let id = item["id"].clone();
            if item["type"] == "reasoning" {
                let text = item
                    .pointer("/content/0/text")
                    .cloned()
                    .unwrap_or(json!(""));
                self.event(
                    out,
                    json!({"type": "response.reasoning_text.done", "item_id": id,
                    "output_index": index, "content_index": 0, "text": text}),
                );
            } else if item["type"] == "message" {
                let text = item
                    .pointer("/content/0/text")
                    .cloned()
                    .unwrap_or(json!(""));
                self.event(
                    out,
                    json!({"type": "response.output_text.done", "item_id": id,
                    "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.event(
                    out,
                    json!({"type": "response.content_part.done", "item_id": id,
                    "output_index": index, "content_index": 0, "part": item["content"][0]}),
                );
            } else {
                self.event(
                    out,
                    json!({"type": "response.function_call_arguments.done",
                    "item_id": id, "output_index": index, "name": item["name"],
                    "arguments": item["arguments"]}),
                );
            }
            self.event(
                out,
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
            );
        }
    }
    let st = St {
        gen,
        base,
        seq: 0,
        started: false,
        finished: false,
        b: Builder::default(),
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let mut s = String::new();
        if !st.started {
            st.started = true;
            let r = st.base.clone();
            st.event(&mut s, json!({"type": "response.created", "response": r}));
            st.event(
                &mut s,
                json!({"type": "response.in_progress", "response": r}),
            );
            return Some((Ok(Bytes::from(s)), st));
        }
        match st.gen.next().await {
            None => st.finished = true,
            Some(Out::Text(t)) => {
                let index = st.index();
                if !matches!(st.b.open, Some(Open::Text { .. })) {
                    st.close(&mut s);
                    let id = new_id("msg_");
                    let index = st.index();
                    st.event(&mut s, json!({"type": "response.output_item.added", "output_index": index,
                        "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
                    st.event(&mut s, json!({"type": "response.content_part.added", "item_id": id,
                        "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                    st.b.open = Some(Open::Text {
                        id,
                        text: String::new(),
                    });
                }
                let _ = index;
                let index = st.index();
                if let Some(Open::Text { id, text }) = &mut st.b.open {
                    text.push_str(&t);
                    let id = id.clone();
                    st.event(
                        &mut s,
                        json!({"type": "response.output_text.delta", "item_id": id,
                        "output_index": index, "content_index": 0, "delta": t, "logprobs": []}),
                    );
                }
            }
            Some(Out::Reasoning(t)) => {
                if !matches!(st.b.open, Some(Open::Reasoning { .. })) {
                    st.close(&mut s);
                    let id = new_id("rs_");
                    let index = st.index();
                    st.event(&mut s, json!({"type": "response.output_item.added", "output_index": index,
                        "item": {"type": "reasoning", "id": id, "status": "in_progress", "summary": [], "content": []}}));
                    st.b.open = Some(Open::Reasoning {
                        id,
                        text: String::new(),
                    });
                }
                let index = st.index();
                if let Some(Open::Reasoning { id, text }) = &mut st.b.open {
                    text.push_str(&t);
                    let id = id.clone();
                    st.event(
                        &mut s,
                        json!({"type": "response.reasoning_text.delta", "item_id": id,
                        "output_index": index, "content_index": 0, "delta": t}),
                    );
                }
            }
            Some(Out::ToolStart { name, .. }) => {
                st.close(&mut s);
                let (id, call_id) = (new_id("fc_"), new_id("call_"));
                let index = st.index();
                st.event(
                    &mut s,
                    json!({"type": "response.output_item.added", "output_index": index,
                    "item": call_item(&id, &call_id, &name, "", "in_progress")}),
                );
                st.b.open = Some(Open::Call {
                    id,
                    call_id,
                    name,
                    args: String::new(),
                });
            }
            Some(Out::ToolArgs { json: delta, .. }) => {
                let index = st.index();
                if let Some(Open::Call { id, args, .. }) = &mut st.b.open {
                    args.push_str(&delta);
                    let id = id.clone();
                    st.event(
                        &mut s,
                        json!({"type": "response.function_call_arguments.delta",
                        "item_id": id, "output_index": index, "delta": delta}),
                    );
                }
            }
            Some(Out::ToolEnd { complete, .. }) => st.close_as(&mut s, item_status(complete)),
            Some(Out::Logprob(_)) => {}
            Some(Out::Failed(e)) => {
                st.finished = true;
                let err = pipeline::backend_error(F, e);
                let mut r = st.base.clone();
                r["status"] = json!("failed");
                r["error"] = json!({"code": "server_error", "message": err.message});
                st.event(&mut s, json!({"type": "response.failed", "response": r}));
            }
            Some(Out::Finished { completion, .. }) => {
                st.finished = true;
                st.close_as(&mut s, item_status(completion.finish != Finish::Length));
                let output = std::mem::take(&mut st.b.output);
                let r = finish(st.base.clone(), output, &completion);
                let kind = if r["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                st.event(&mut s, json!({"type": kind, "response": r}));
            }
        }
        Some((Ok(Bytes::from(s)), st))
    })
}
