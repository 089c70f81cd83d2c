//! gpt-oss's harmony format: the reply is a sequence of messages, each
//! `<|start|>assistant` + header + `<|message|>` + body + an end token.
//!
//! The header names a channel and maybe a recipient:
//! * `<|channel|>analysis` is the chain of thought -> reasoning;
//! * `<|channel|>final`, and `commentary` without a recipient (a preamble
//!   shown to the user) -> text;
//! * a recipient, `to=functions.NAME`, written after the channel
//!   (`<|channel|>commentary to=functions.NAME <|constrain|>json`, as the
//!   model does) or before it (`assistant to=functions.NAME<|channel|>commentary json`,
//!   as the chat template renders history) -> a tool call whose body is the
//!   JSON arguments.
//!
//! Bodies end with `<|end|>` (more messages follow), `<|call|>` or
//! `<|return|>` (both stop generation: they are end-of-sequence tokens, so
//! the output usually just ends). The prompt ends with `<|start|>assistant`,
//! so the output starts in the first header. These markers are special
//! tokens: the server must decode with special tokens kept.

use super::ToolEvent;

pub(super) const START: &str = "<|start|>";
pub(super) const CHANNEL: &str = "<|channel|>";
pub(super) const MESSAGE: &str = "<|message|>";
pub(super) const CONSTRAIN: &str = "<|constrain|>";
const ENDS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", START];
/// A header longer than this with no `<|message|>` is not a header: the
/// model is not writing harmony, and its output is text.
const MAX_HEADER: usize = 512;

#[derive(Debug, Clone, PartialEq)]
enum Body {
    Reasoning,
    Text,
    Call(String),
}

#[derive(Debug)]
enum State {
    Header,
    Body(Body),
    /// The model does not speak harmony: everything is text.
    Plain,
}

#[derive(Debug)]
pub(super) struct HarmonyParser {
    state: State,
    buf: String,
    calls: usize,
}

/// How much of the end of `s` may be the start of a terminator.
fn held_back(s: &str) -> usize {
    match s.rfind('<') {
        Some(p) if ENDS.iter().any(|e| e.starts_with(&s[p..])) => s.len() - p,
        _ => 0,
    }
}

/// The recipient and channel a header names.
fn parse_header(h: &str) -> (Option<String>, Option<String>) {
    let word = |s: &str| -> String {
        s.split(|c: char| c.is_whitespace() || c == '<')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    let recipient = h
        .find("to=")
        .map(|p| word(&h[p + 3..]))
        .filter(|r| !r.is_empty());
    let channel = h
        .find(CHANNEL)
        .map(|p| word(h[p + CHANNEL.len()..].trim_start()))
        .filter(|c| !c.is_empty());
    (recipient, channel)
}

impl HarmonyParser {
    pub fn new() -> Self {
        Self {
            state: State::Header,
            buf: String::new(),
            calls: 0,
        }
    }

    pub fn push(&mut self, delta: &str, out: &mut Vec<ToolEvent>) {
        self.buf.push_str(delta);
        while self.step(out) {}
    }

    pub fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        let rest = std::mem::take(&mut self.buf);
        match std::mem::replace(&mut self.state, State::Header) {
            // An unfinished header says nothing; a lone `<|start|>…` neither.
            State::Header => {}
            State::Plain | State::Body(Body::Text) => out.push(ToolEvent::Text(rest)),
            State::Body(Body::Reasoning) => out.push(ToolEvent::Reasoning(rest)),
            // `<|call|>` is an end-of-sequence token: a call body usually
            // ends with the output.
            State::Body(Body::Call(name)) => self.emit_call(name, &rest, out),
        }
    }

    fn step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        match &self.state {
            State::Plain => {
                out.push(ToolEvent::Text(std::mem::take(&mut self.buf)));
                false
            }
            State::Header => {
                let Some(p) = self.buf.find(MESSAGE) else {
                    if self.buf.len() > MAX_HEADER {
                        self.state = State::Plain;
                        return true;
                    }
                    return false;
                };
                let header = self.buf[..p].to_owned();
                self.buf.drain(..p + MESSAGE.len());
                let (recipient, channel) = parse_header(&header);
                let body = match (recipient, channel.as_deref()) {
                    (Some(r), _) => {
                        Body::Call(r.strip_prefix("functions.").unwrap_or(&r).to_owned())
                    }
                    (None, Some("analysis")) => Body::Reasoning,
                    (None, _) => Body::Text,
                };
                self.state = State::Body(body);
                true
            }
            State::Body(kind) => {
                let end = ENDS
                    .iter()
                    .filter_map(|e| self.buf.find(e).map(|p| (p, e.len())))
                    .min();
                let kind = kind.clone();
                match end {
                    Some((p, len)) => {
                        let body = self.buf[..p].to_owned();
                        // `<|start|>` begins the next header: keep it there.
                        let consumed = if self.buf[p..].starts_with(START) {
                            p
                        } else {
                            p + len
                        };
                        self.buf.drain(..consumed);
                        self.state = State::Header;
                        match kind {
                            Body::Reasoning => out.push(ToolEvent::Reasoning(body)),
                            Body::Text => out.push(ToolEvent::Text(body)),
                            Body::Call(name) => self.emit_call(name, &body, out),
                        }
                        true
                    }
                    None => {
                        let release = self.buf.len() - held_back(&self.buf);
                        match kind {
                            Body::Reasoning => {
                                out.push(ToolEvent::Reasoning(self.buf[..release].to_owned()))
                            }
                            Body::Text => out.push(ToolEvent::Text(self.buf[..release].to_owned())),
                            // A call's body is emitted whole.
                            Body::Call(_) => return false,
                        }
                        self.buf.drain(..release);
                        false
                    }
                }
            }
        }
    }

    fn emit_call(&mut self, name: String, body: &str, out: &mut Vec<ToolEvent>) {
        let args = match serde_json::from_str::<serde_json::Value>(body.trim()) {
            Ok(serde_json::Value::Null) => Some("{}".to_owned()),
            Ok(obj @ serde_json::Value::Object(_)) => Some(obj.to_string()),
            _ => None,
        };
        match args {
            Some(json) => {
                let index = self.calls;
                self.calls += 1;
                out.push(ToolEvent::CallStart { index, name });
                out.push(ToolEvent::ArgsDelta { index, json });
                out.push(ToolEvent::CallEnd { index });
            }
            // Not JSON: what the model wrote, as text, rather than a call
            // whose arguments a client cannot read.
            None => out.push(ToolEvent::Text(body.to_owned())),
        }
    }
}

/// The forced start of a harmony call (to `name`, if given): the prompt
/// ends with `<|start|>assistant`.
pub(super) fn forced_prefix(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{CHANNEL}commentary to=functions.{n} {CONSTRAIN}json{MESSAGE}"),
        None => format!("{CHANNEL}commentary to=functions."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::{collect_all, merge_text};
    use serde_json::json;

    fn parse(text: &str, n: usize) -> crate::toolcall::Parsed {
        let mut p = HarmonyParser::new();
        let mut out = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for c in chars.chunks(n) {
            p.push(&c.iter().collect::<String>(), &mut out);
        }
        p.finish(&mut out);
        collect_all(&merge_text(out))
    }

    #[test]
    fn model_style_channels_and_call() {
        let out = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Oslo\"}<|call|>";
        for n in [1, 2, 3, 500] {
            let p = parse(out, n);
            assert_eq!(p.reasoning, "Need weather.");
            assert_eq!(p.text, "");
            assert_eq!(p.calls.len(), 1);
            assert_eq!(p.calls[0].name, "get_weather");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&p.calls[0].arguments).ok(),
                Some(json!({"city": "Oslo"}))
            );
        }
        // The end token is not part of the output (it is end-of-sequence).
        let out = "<|channel|>analysis<|message|>Hmm<|end|><|start|>assistant<|channel|>final<|message|>Hi <b>there</b>";
        for n in [1, 2, 3] {
            let p = parse(out, n);
            assert_eq!(
                (p.reasoning.as_str(), p.text.as_str()),
                ("Hmm", "Hi <b>there</b>")
            );
        }
    }

    #[test]
    fn non_harmony_output_is_text() {
        let long = "plain words ".repeat(60);
        assert_eq!(parse(&long, 7).text, long);
    }
}
