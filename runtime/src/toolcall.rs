//! Parsing a model's tool-call output while it streams.
//!
//! Qwen-family models announce a tool call with `<tool_call>` and then write
//! it in one of two forms:
//!
//! * Qwen3-Coder's XML form:
//!   `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>`
//! * the Hermes JSON form used by Qwen2.5/Qwen3:
//!   `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`
//!
//! [`ToolCallParser`] takes the text deltas of a generation and turns them
//! into [`ToolEvent`]s: plain text, and for each call a start (with the
//! function name), argument fragments, and an end. The argument fragments of
//! one call concatenate to one JSON object, so a server can forward them as
//! OpenAI `function.arguments` deltas or Anthropic `input_json_delta`s. The
//! XML form is streamed one parameter at a time, as soon as each
//! `</parameter>` arrives; the JSON form only once the whole object is in,
//! because its name may follow its arguments.
//!
//! XML parameter values are untyped text; like vLLM's `qwen3coder` parser we
//! type them from the tool's JSON schema (`string` stays text, everything else
//! is parsed as JSON and falls back to text).

use std::collections::HashMap;

mod framed;
mod harmony;
mod output;
mod pylit;
#[cfg(test)]
mod roundtrip_tests;
mod think;
mod trim;

pub use output::{ends_in_reasoning, parse_all, ChatFormat, OutputParser, ParserSpec};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const FUNC_OPEN: &str = "<function=";
const FUNC_CLOSE: &str = "</function>";
const PARAM_OPEN: &str = "<parameter=";
const PARAM_CLOSE: &str = "</parameter>";

/// Which of the two tool-call forms a chat template teaches its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolForm {
    /// Qwen3-Coder: `<tool_call>\n<function=NAME>\n<parameter=…`.
    Xml,
    /// Qwen2.5/Qwen3 (Hermes): `<tool_call>\n{"name": …, "arguments": …}`.
    Hermes,
}

impl ToolForm {
    /// Reads the form off a prompt rendered with tools: the Qwen3-Coder
    /// template's instructions show `<function=` and the Hermes ones do not.
    /// A template that describes neither gets the Hermes form, the one
    /// Qwen-family models without tool instructions still know best.
    pub fn detect(rendered_prompt: &str) -> Self {
        if rendered_prompt.contains(FUNC_OPEN) {
            Self::Xml
        } else {
            Self::Hermes
        }
    }

    /// The start of an assistant turn that commits the model to a tool
    /// call (to `name`, when given). It ends where the template's own
    /// rendering of a call has a token boundary (after `>\n`, or after `:`
    /// rather than after the space that the model writes fused with `{`), so
    /// the model continues in the tokens it was trained on.
    pub fn forced_prefix(self, name: Option<&str>) -> String {
        match (self, name) {
            (Self::Xml, Some(n)) => format!("{CALL_OPEN}\n{FUNC_OPEN}{n}>\n"),
            (Self::Xml, None) => format!("{CALL_OPEN}\n<function"),
            (Self::Hermes, Some(n)) => {
                let n = serde_json::Value::String(n.to_owned());
                format!("{CALL_OPEN}\n{{\"name\": {n}, \"arguments\":")
            }
            (Self::Hermes, None) => format!("{CALL_OPEN}\n{{\"name\":"),
        }
    }
}

/// What the parser found in the model's output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    /// Ordinary assistant text.
    Text(String),
    /// The model's reasoning (a `<think>` block, harmony's analysis
    /// channel), to be returned apart from the text.
    Reasoning(String),
    /// A call to `name` begins; `index` counts calls from 0 in this output.
    CallStart { index: usize, name: String },
    /// More of the call's arguments, as JSON text.
    ArgsDelta { index: usize, json: String },
    /// The call's arguments are complete.
    CallEnd { index: usize },
}

/// The parameter types declared by the request's tools, used to type XML
/// parameter values. Keyed by function name, then parameter name, the value
/// being the JSON-schema `type` (e.g. "string", "integer", "object").
#[derive(Debug, Clone, Default)]
pub struct ToolSchemas {
    types: HashMap<String, HashMap<String, String>>,
}

impl ToolSchemas {
    /// Reads OpenAI-style tools (`{"type":"function","function":{"name","parameters"}}`)
    /// or bare function objects (`{"name","parameters"}`); anything else is ignored.
    pub fn from_openai_tools(tools: &[serde_json::Value]) -> Self {
        let mut types = HashMap::new();
        for tool in tools {
            let func = tool.get("function").unwrap_or(tool);
            let Some(name) = func.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let mut params = HashMap::new();
            let props = func
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(|p| p.as_object());
            for (key, schema) in props.into_iter().flatten() {
                let ty = match schema.get("type") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    // ["string", "null"] and the like: the first non-null type wins.
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|t| t.as_str())
                        .find(|t| *t != "null")
                        .unwrap_or("string")
                        .to_owned(),
                    _ => "string".to_owned(),
                };
                params.insert(key.clone(), ty);
            }
            types.insert(name.to_owned(), params);
        }
        Self { types }
    }

    pub(crate) fn type_of(&self, func: &str, param: &str) -> Option<&str> {
        self.types.get(func)?.get(param).map(String::as_str)
    }
}

/// Turns an XML parameter's raw text into a JSON value, guided by the schema.
fn typed_value(raw: &str, ty: Option<&str>) -> serde_json::Value {
    // The template writes the value on its own line(s); those newlines are
    // framing, not content.
    let raw = raw.strip_prefix('\n').unwrap_or(raw);
    let raw = raw.strip_suffix('\n').unwrap_or(raw);
    typed_by_schema(raw, ty)
}

/// A parameter value typed by its schema `type`: `string` stays text; a
/// declared non-string type is JSON, or a Python literal (see `pylit`);
/// an undeclared parameter is JSON if it parses; otherwise text.
pub(crate) fn typed_by_schema(raw: &str, ty: Option<&str>) -> serde_json::Value {
    let text = || serde_json::Value::String(raw.to_owned());
    match ty {
        Some("string") => text(),
        Some(_) => pylit::parse_loose(raw).unwrap_or_else(text),
        None => serde_json::from_str(raw.trim()).unwrap_or_else(|_| text()),
    }
}

#[derive(Debug)]
enum State {
    /// Plain text, watching for `<tool_call>`.
    Text,
    /// After `<tool_call>`, before we know which form follows.
    CallHead,
    /// Inside an XML call, between tags.
    Xml {
        index: usize,
        name: String,
        params: usize,
    },
    /// Inside an XML call's `<parameter=KEY>`, collecting the value.
    XmlParam {
        index: usize,
        name: String,
        params: usize,
        key: String,
    },
    /// After `</function>`, waiting for `</tool_call>`.
    XmlTail,
    /// Inside a JSON call, collecting until `</tool_call>`.
    Json,
}

/// Incremental parser; feed it deltas with [`push`](Self::push) and call
/// [`finish`](Self::finish) when the generation ends.
#[derive(Debug)]
pub struct ToolCallParser {
    schemas: ToolSchemas,
    state: State,
    /// Text not yet consumed (may end in a partial tag).
    buf: String,
    calls: usize,
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`:
/// that much text must be held back, since the tag may be completing.
fn partial_tag_len(s: &str, tag: &str) -> usize {
    let max = tag.len().saturating_sub(1).min(s.len());
    (1..=max)
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ToolCallParser {
    pub fn new(schemas: ToolSchemas) -> Self {
        Self {
            schemas,
            state: State::Text,
            buf: String::new(),
            calls: 0,
        }
    }

    /// A parser for output that continues `prefix`, text the server wrote
    /// at the start of the assistant turn (see [`ToolForm::forced_prefix`]).
    /// The prefix is parsed as if the model had written it, so a call it
    /// opens comes out whole; the events it already completes (a named XML
    /// call's start) are returned with the parser.
    pub fn with_prefix(schemas: ToolSchemas, prefix: &str) -> (Self, Vec<ToolEvent>) {
        let mut p = Self::new(schemas);
        let events = p.push(prefix);
        (p, events)
    }

    /// Number of complete or begun tool calls so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Consumes a delta of model output and returns what it completes.
    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        merge_text(out)
    }

    /// Ends the output: held-back text is released, and a call cut off by
    /// the end of generation is closed with the arguments seen so far.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => out.push(ToolEvent::Text(rest)),
            // `<tool_call>` with nothing usable after it: give the text back.
            State::CallHead => out.push(ToolEvent::Text(format!("{CALL_OPEN}{rest}"))),
            State::Xml { index, params, .. } | State::XmlParam { index, params, .. } => {
                out.push(ToolEvent::ArgsDelta {
                    index,
                    json: if params == 0 { "{}".into() } else { "}".into() },
                });
                out.push(ToolEvent::CallEnd { index });
            }
            State::XmlTail => {}
            State::Json => self.emit_json_call(&rest, &mut out),
        }
        merge_text(out)
    }

    /// Makes one step of progress; returns false when more input is needed.
    fn step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        match &mut self.state {
            State::Text => {
                if let Some(pos) = self.buf.find(CALL_OPEN) {
                    out.push(ToolEvent::Text(self.buf[..pos].to_owned()));
                    self.buf.drain(..pos + CALL_OPEN.len());
                    self.state = State::CallHead;
                    true
                } else {
                    let keep = partial_tag_len(&self.buf, CALL_OPEN);
                    let release = self.buf.len() - keep;
                    if release > 0 {
                        out.push(ToolEvent::Text(self.buf[..release].to_owned()));
                        self.buf.drain(..release);
                    }
                    false
                }
            }
            State::CallHead => {
                let trimmed = self.buf.trim_start();
                if trimmed.is_empty() {
                    return false;
                }
                if trimmed.starts_with('{') {
                    self.state = State::Json;
                    return true;
                }
                if trimmed.len() < FUNC_OPEN.len() && FUNC_OPEN.starts_with(trimmed) {
                    return false;
                }
                if let Some(after) = trimmed.strip_prefix(FUNC_OPEN) {
                    let Some(end) = after.find('>') else {
                        return false;
                    };
                    let name = after[..end].trim().to_owned();
                    let consumed = self.buf.len() - after.len() + end + 1;
                    self.buf.drain(..consumed);
                    let index = self.calls;
                    self.calls += 1;
                    out.push(ToolEvent::CallStart {
                        index,
                        name: name.clone(),
                    });
                    self.state = State::Xml {
                        index,
                        name,
                        params: 0,
                    };
                    return true;
                }
                // Neither form: it was text after all.
                out.push(ToolEvent::Text(CALL_OPEN.to_owned()));
                self.state = State::Text;
                true
            }
            State::Xml {
                index,
                name,
                params,
            } => {
                let trimmed = self.buf.trim_start();
                let skipped = self.buf.len() - trimmed.len();
                if let Some(after) = trimmed.strip_prefix(PARAM_OPEN) {
                    let Some(end) = after.find('>') else {
                        return false;
                    };
                    let key = after[..end].trim().to_owned();
                    let consumed = skipped + PARAM_OPEN.len() + end + 1;
                    self.buf.drain(..consumed);
                    self.state = State::XmlParam {
                        index: *index,
                        name: std::mem::take(name),
                        params: *params,
                        key,
                    };
                    return true;
                }
                if trimmed.starts_with(FUNC_CLOSE) {
                    self.buf.drain(..skipped + FUNC_CLOSE.len());
                    let json = if *params == 0 { "{}" } else { "}" };
                    out.push(ToolEvent::ArgsDelta {
                        index: *index,
                        json: json.to_owned(),
                    });
                    out.push(ToolEvent::CallEnd { index: *index });
                    self.state = State::XmlTail;
                    return true;
                }
                if trimmed.starts_with(CALL_CLOSE) {
                    // `</function>` omitted: the call still ends here.
                    self.buf.drain(..skipped + CALL_CLOSE.len());
                    let json = if *params == 0 { "{}" } else { "}" };
                    out.push(ToolEvent::ArgsDelta {
                        index: *index,
                        json: json.to_owned(),
                    });
                    out.push(ToolEvent::CallEnd { index: *index });
                    self.state = State::Text;
                    return true;
                }
                if trimmed.is_empty()
                    || PARAM_OPEN.starts_with(trimmed)
                    || FUNC_CLOSE.starts_with(trimmed)
                    || CALL_CLOSE.starts_with(trimmed)
                {
                    return false;
                }
                // Stray text or an unknown tag between tags: drop it, up to
                // the next tag.
                let from = if trimmed.starts_with('<') { 1 } else { 0 };
                match trimmed[from..].find('<') {
                    Some(p) => {
                        self.buf.drain(..skipped + from + p);
                        true
                    }
                    None => false,
                }
            }
            State::XmlParam {
                index,
                name,
                params,
                key,
            } => {
                let Some(end) = self.buf.find(PARAM_CLOSE) else {
                    // A value may hold a nested `<function=` in a code sample,
                    // so only `</parameter>` closes it. Qwen3-Coder sometimes
                    // omits it before the next parameter or `</function>`.
                    if let Some(p) = self
                        .buf
                        .find(&format!("\n{PARAM_OPEN}"))
                        .or_else(|| self.buf.find(&format!("\n{FUNC_CLOSE}")))
                    {
                        let raw = self.buf[..p + 1].to_owned();
                        self.buf.drain(..p + 1);
                        let (index, params) = (*index, *params);
                        let (name, key) = (std::mem::take(name), std::mem::take(key));
                        out.push(self.param_delta(index, &name, params, &key, &raw));
                        self.state = State::Xml {
                            index,
                            name,
                            params: params + 1,
                        };
                        return true;
                    }
                    return false;
                };
                let raw = self.buf[..end].to_owned();
                self.buf.drain(..end + PARAM_CLOSE.len());
                let (index, params) = (*index, *params);
                let (name, key) = (std::mem::take(name), std::mem::take(key));
                out.push(self.param_delta(index, &name, params, &key, &raw));
                self.state = State::Xml {
                    index,
                    name,
                    params: params + 1,
                };
                true
            }
            State::XmlTail => {
                let trimmed = self.buf.trim_start();
                let skipped = self.buf.len() - trimmed.len();
                if trimmed.starts_with(CALL_CLOSE) {
                    self.buf.drain(..skipped + CALL_CLOSE.len());
                    self.state = State::Text;
                    return true;
                }
                if trimmed.is_empty() || CALL_CLOSE.starts_with(trimmed) {
                    return false;
                }
                // `</tool_call>` omitted: whatever follows is text again.
                self.buf.drain(..skipped);
                self.state = State::Text;
                true
            }
            State::Json => {
                let Some(end) = self.buf.find(CALL_CLOSE) else {
                    return false;
                };
                let body = self.buf[..end].to_owned();
                self.buf.drain(..end + CALL_CLOSE.len());
                self.state = State::Text;
                self.emit_json_call(&body, out);
                true
            }
        }
    }

    fn param_delta(
        &self,
        index: usize,
        func: &str,
        params: usize,
        key: &str,
        raw: &str,
    ) -> ToolEvent {
        let value = typed_value(raw, self.schemas.type_of(func, key));
        let key_json = serde_json::Value::String(key.to_owned());
        let sep = if params == 0 { "{" } else { ", " };
        ToolEvent::ArgsDelta {
            index,
            json: format!("{sep}{key_json}: {value}"),
        }
    }

    /// Emits a Hermes JSON call, or gives the text back if it is not one.
    fn emit_json_call(&mut self, body: &str, out: &mut Vec<ToolEvent>) {
        let parsed: Option<(String, String)> =
            serde_json::from_str::<serde_json::Value>(body.trim())
                .ok()
                .and_then(|v| {
                    let name = v.get("name")?.as_str()?.to_owned();
                    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
                        None | Some(serde_json::Value::Null) => "{}".to_owned(),
                        // Some models write arguments as a JSON string; unwrap it when it holds JSON.
                        Some(serde_json::Value::String(s)) => {
                            match serde_json::from_str::<serde_json::Value>(s) {
                                Ok(inner @ serde_json::Value::Object(_)) => inner.to_string(),
                                _ => return None,
                            }
                        }
                        Some(obj @ serde_json::Value::Object(_)) => obj.to_string(),
                        Some(_) => return None,
                    };
                    Some((name, args))
                });
        match parsed {
            Some((name, json)) => {
                let index = self.calls;
                self.calls += 1;
                out.push(ToolEvent::CallStart { index, name });
                out.push(ToolEvent::ArgsDelta { index, json });
                out.push(ToolEvent::CallEnd { index });
            }
            None => out.push(ToolEvent::Text(format!("{CALL_OPEN}{body}"))),
        }
    }
}

/// Drops empty text and reasoning events and joins neighbouring ones of
/// the same kind.
pub(crate) fn merge_text(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for ev in events {
        match ev {
            ToolEvent::Text(t) | ToolEvent::Reasoning(t) if t.is_empty() => {}
            ToolEvent::Text(t) => match out.last_mut() {
                Some(ToolEvent::Text(prev)) => prev.push_str(&t),
                _ => out.push(ToolEvent::Text(t)),
            },
            ToolEvent::Reasoning(t) => match out.last_mut() {
                Some(ToolEvent::Reasoning(prev)) => prev.push_str(&t),
                _ => out.push(ToolEvent::Reasoning(t)),
            },
            other => out.push(other),
        }
    }
    out
}

/// Parses a complete output at once (for non-streaming responses).
pub fn parse_complete(text: &str, schemas: ToolSchemas) -> Vec<ToolEvent> {
    let mut p = ToolCallParser::new(schemas);
    let mut events = p.push(text);
    events.extend(p.finish());
    merge_text(events)
}

/// A tool call assembled from events: name and argument JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// Splits parsed events into the text and the calls they describe.
pub fn collect(events: &[ToolEvent]) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for ev in events {
        match ev {
            ToolEvent::Text(t) => text.push_str(t),
            ToolEvent::CallStart { name, .. } => calls.push(ToolCall {
                name: name.clone(),
                arguments: String::new(),
            }),
            ToolEvent::ArgsDelta { index, json } => {
                if let Some(c) = calls.get_mut(*index) {
                    c.arguments.push_str(json);
                }
            }
            ToolEvent::CallEnd { .. } | ToolEvent::Reasoning(_) => {}
        }
    }
    (text, calls)
}

/// The reasoning, text and calls a whole output holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub reasoning: String,
    pub text: String,
    pub calls: Vec<ToolCall>,
}

/// Like [`collect`], keeping the reasoning too.
pub fn collect_all(events: &[ToolEvent]) -> Parsed {
    let (text, calls) = collect(events);
    let reasoning = events
        .iter()
        .filter_map(|e| match e {
            ToolEvent::Reasoning(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    Parsed {
        reasoning,
        text,
        calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schemas() -> ToolSchemas {
        ToolSchemas::from_openai_tools(&[json!({
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": ["string", "null"]},
                    "opts": {"type": "object"}
                }}
            }
        })])
    }

    /// Feeds `text` in chunks of `n` bytes (on char boundaries) and collects.
    fn chunked(text: &str, n: usize) -> Vec<ToolEvent> {
        let mut p = ToolCallParser::new(schemas());
        let mut events = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + n).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            events.extend(p.push(&text[start..end]));
            start = end;
        }
        events.extend(p.finish());
        merge_text(events)
    }

    const XML: &str = "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=opts>\n{\"x\": [1, 2]}\n</parameter>\n</function>\n</tool_call>";

    #[test]
    fn xml_call_is_typed_by_schema_and_same_for_every_chunking() {
        let whole = parse_complete(XML, schemas());
        let (text, calls) = collect(&whole);
        assert_eq!(text, "Let me check.\n");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        let args: serde_json::Value =
            serde_json::from_str(&calls[0].arguments).expect("arguments are JSON");
        assert_eq!(
            args,
            json!({"city": "São Paulo", "days": 3, "opts": {"x": [1, 2]}})
        );
        for n in [1, 2, 3, 5, 7, 13, 64] {
            let (t, c) = collect(&chunked(XML, n));
            assert_eq!((t.as_str(), &c), (text.as_str(), &calls), "chunk size {n}");
        }
    }

    #[test]
    fn xml_arguments_stream_one_parameter_at_a_time() {
        let mut p = ToolCallParser::new(schemas());
        let cut = XML.find("<parameter=days>").expect("fixture");
        let first = p.push(&XML[..cut]);
        assert_eq!(
            first,
            vec![
                ToolEvent::Text("Let me check.\n".into()),
                ToolEvent::CallStart {
                    index: 0,
                    name: "get_weather".into()
                },
                ToolEvent::ArgsDelta {
                    index: 0,
                    json: "{\"city\": \"São Paulo\"".into()
                },
            ]
        );
        let rest = p.push(&XML[cut..]);
        assert_eq!(rest.last(), Some(&ToolEvent::CallEnd { index: 0 }));
        assert!(p.finish().is_empty());
    }

    #[test]
    fn string_typed_values_stay_text_and_untyped_ones_fall_back() {
        let out = "<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n<parameter=note>\nnot json\n</parameter>\n<parameter=units>\nnull\n</parameter>\n</function>\n</tool_call>";
        let (_, calls) = collect(&parse_complete(out, schemas()));
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).expect("json");
        assert_eq!(
            args,
            json!({"city": "123", "note": "not json", "units": "null"})
        );
    }

    #[test]
    fn xml_without_parameters_has_empty_object() {
        let (_, calls) = collect(&parse_complete(
            "<tool_call>\n<function=now>\n</function>\n</tool_call>",
            schemas(),
        ));
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "now".into(),
                arguments: "{}".into()
            }]
        );
    }

    #[test]
    fn hermes_json_calls_and_text_around_them() {
        let out = "Sure.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": \"{}\"}\n</tool_call>";
        for n in [1, 4, 1000] {
            let events = chunked(out, n);
            let (text, calls) = collect(&events);
            assert_eq!(text, "Sure.\n", "chunk {n}");
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&calls[0].arguments).ok(),
                Some(json!({"city": "Oslo"}))
            );
            assert_eq!(
                calls[1],
                ToolCall {
                    name: "now".into(),
                    arguments: "{}".into()
                }
            );
        }
    }

    #[test]
    fn malformed_json_call_is_returned_as_text() {
        let out = "<tool_call>\n{\"name\": oops}\n</tool_call>";
        let (text, calls) = collect(&parse_complete(out, schemas()));
        assert!(calls.is_empty());
        assert_eq!(text, "<tool_call>\n{\"name\": oops}\n");
    }

    #[test]
    fn lookalike_text_is_not_held_forever() {
        let events = chunked("a < b and <tool> and <tool_cal", 3);
        assert_eq!(
            events,
            vec![ToolEvent::Text("a < b and <tool> and <tool_cal".into())]
        );
        let events = chunked("<tool_call>plain words", 2);
        assert_eq!(
            events,
            vec![ToolEvent::Text("<tool_call>plain words".into())]
        );
    }

    #[test]
    fn call_cut_off_by_max_tokens_is_closed_as_valid_json() {
        let out = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n2";
        let events = parse_complete(out, schemas());
        let (_, calls) = collect(&events);
        assert_eq!(calls.len(), 1);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&calls[0].arguments).ok(),
            Some(json!({"city": "Rome"}))
        );
        assert_eq!(events.last(), Some(&ToolEvent::CallEnd { index: 0 }));
    }

    #[test]
    fn missing_parameter_close_tag_is_tolerated() {
        let out = "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n<parameter=days>\n4\n</function>\n</tool_call>tail";
        let (text, calls) = collect(&parse_complete(out, schemas()));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&calls[0].arguments).ok(),
            Some(json!({"city": "Lima", "days": 4}))
        );
        assert_eq!(text, "tail");
    }
}
