//! The whole of a chat model's output: reasoning, text and tool calls, in
//! the format its chat template teaches.
//!
//! [`ChatFormat::detect`] reads the format off the template (each family's
//! template spells out its own markers); [`OutputParser`] then splits the
//! streamed output into [`ToolEvent`]s: reasoning (`<think>` blocks,
//! harmony's analysis channel) apart from text, tool calls apart from both.
//! Whitespace at the edges of reasoning and text is template layout and is
//! dropped (see `trim`).

use super::framed::{self, Dialect, FramedParser};
use super::harmony::{self, HarmonyParser};
use super::think::{Piece, ThinkSplitter, THINK_CLOSE, THINK_OPEN};
use super::trim::EdgeTrim;
use super::{merge_text, ToolCallParser, ToolEvent, ToolForm, ToolSchemas};

/// A model family's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// Qwen: `<tool_call>` with Hermes JSON or Qwen3-Coder XML inside.
    Qwen(ToolForm),
    /// gpt-oss: harmony channels.
    Harmony,
    /// MiniMax-M2's `<minimax:tool_call>`.
    MiniMax,
    /// GLM-4.5+'s `<tool_call>NAME<arg_key>…`.
    Glm,
    /// DeepSeek-V3.1's `<｜tool▁calls▁begin｜>`.
    DeepSeek,
    /// DeepSeek-V3.2's DSML `<｜DSML｜function_calls>`.
    Dsml,
}

impl ChatFormat {
    /// The format of a model whose chat template is `template` (when the
    /// server has one) and which rendered `prompt`. The family comes from
    /// the markers its template writes; within the Qwen family, from what
    /// the rendered tool instructions show ([`ToolForm::detect`]).
    pub fn detect(template: Option<&str>, prompt: &str) -> Self {
        let t = template.unwrap_or(prompt);
        if t.contains(harmony::CHANNEL) && t.contains(harmony::MESSAGE) {
            Self::Harmony
        } else if t.contains(framed::MINIMAX_OPEN) {
            Self::MiniMax
        } else if t.contains("<arg_key>") {
            Self::Glm
        } else if t.contains("｜DSML｜") {
            Self::Dsml
        } else if t.contains(framed::DS_CALLS_OPEN) {
            Self::DeepSeek
        } else {
            Self::Qwen(ToolForm::detect(prompt))
        }
    }

    /// The strings this format's parser must see in the decoded output.
    /// Where the tokenizer has any of them as a *special* token, the
    /// output must be decoded with special tokens kept (harmony's always are).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Qwen(_) => &["<tool_call>", "</tool_call>", THINK_OPEN, THINK_CLOSE],
            Self::Harmony => &[
                harmony::START,
                harmony::CHANNEL,
                harmony::MESSAGE,
                harmony::CONSTRAIN,
                "<|end|>",
            ],
            Self::MiniMax => &[
                framed::MINIMAX_OPEN,
                "</minimax:tool_call>",
                THINK_OPEN,
                THINK_CLOSE,
            ],
            Self::Glm => &[
                framed::GLM_OPEN,
                "</tool_call>",
                "<arg_key>",
                "</arg_key>",
                "<arg_value>",
                "</arg_value>",
                THINK_OPEN,
                THINK_CLOSE,
            ],
            Self::DeepSeek => &[
                framed::DS_CALLS_OPEN,
                "<｜tool▁calls▁end｜>",
                framed::DS_CALL_OPEN,
                "<｜tool▁call▁end｜>",
                framed::DS_SEP,
                THINK_OPEN,
                THINK_CLOSE,
            ],
            Self::Dsml => &[THINK_OPEN, THINK_CLOSE],
        }
    }

    /// Whether the template writes `<think>` blocks (harmony has channels
    /// instead).
    fn thinks(self, template: Option<&str>, prompt: &str) -> bool {
        match self {
            Self::Harmony => false,
            _ => template.unwrap_or(prompt).contains(THINK_CLOSE),
        }
    }

    /// The start of an assistant turn that commits the model to a tool call
    /// (to `name`, when given). `in_reasoning`: the prompt ends inside an
    /// open `<think>` block, which the prefix closes first.
    pub fn forced_prefix(self, name: Option<&str>, in_reasoning: bool) -> String {
        let close = match self {
            _ if !in_reasoning => "",
            Self::Qwen(_) | Self::MiniMax => "</think>\n\n",
            _ => THINK_CLOSE,
        };
        let call = match (self, name) {
            (Self::Qwen(form), n) => form.forced_prefix(n),
            (Self::Harmony, n) => harmony::forced_prefix(n),
            (Self::MiniMax, Some(n)) => format!(
                "{}\n{}{n}\">\n",
                framed::MINIMAX_OPEN,
                framed::MINIMAX_INVOKE
            ),
            (Self::MiniMax, None) => {
                format!("{}\n{}", framed::MINIMAX_OPEN, framed::MINIMAX_INVOKE)
            }
            (Self::Glm, n) => format!("{}{}", framed::GLM_OPEN, n.unwrap_or("")),
            (Self::DeepSeek, Some(n)) => {
                format!(
                    "{}{}{n}{}",
                    framed::DS_CALLS_OPEN,
                    framed::DS_CALL_OPEN,
                    framed::DS_SEP
                )
            }
            (Self::DeepSeek, None) => format!("{}{}", framed::DS_CALLS_OPEN, framed::DS_CALL_OPEN),
            (Self::Dsml, Some(n)) => {
                format!("\n\n{}\n{}{n}\">\n", framed::DSML_OPEN, framed::DSML_INVOKE)
            }
            (Self::Dsml, None) => format!("\n\n{}\n{}", framed::DSML_OPEN, framed::DSML_INVOKE),
        };
        format!("{close}{call}")
    }
}

/// Whether a rendered prompt ends inside an open `<think>` block (the
/// template opened it for the model to continue).
pub fn ends_in_reasoning(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_OPEN)
}

/// What an [`OutputParser`] needs to know about a request.
#[derive(Debug, Clone)]
pub struct ParserSpec {
    pub format: ChatFormat,
    /// The request's tools; `None` when it offered none (or chose `none`):
    /// tool-call markup is then text.
    pub tools: Option<ToolSchemas>,
    /// Split `<think>` blocks off as reasoning.
    pub think: bool,
    /// The prompt left a `<think>` block open.
    pub in_reasoning: bool,
}

impl ParserSpec {
    /// The spec for a prompt rendered by `template` (its source, when known).
    pub fn new(template: Option<&str>, prompt: &str, tools: Option<ToolSchemas>) -> Self {
        let format = ChatFormat::detect(template, prompt);
        let think = format.thinks(template, prompt);
        Self {
            format,
            tools,
            think,
            in_reasoning: think && ends_in_reasoning(prompt),
        }
    }
}

#[derive(Debug)]
enum Inner {
    Plain,
    Qwen(ToolCallParser),
    Framed(FramedParser),
    Harmony(HarmonyParser),
}

impl Inner {
    fn push(&mut self, delta: &str, out: &mut Vec<ToolEvent>) {
        match self {
            Self::Plain => out.push(ToolEvent::Text(delta.to_owned())),
            Self::Qwen(p) => out.extend(p.push(delta)),
            Self::Framed(p) => p.push(delta, out),
            Self::Harmony(p) => p.push(delta, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self {
            Self::Plain => {}
            Self::Qwen(p) => out.extend(p.finish()),
            Self::Framed(p) => p.finish(out),
            Self::Harmony(p) => p.finish(out),
        }
    }
}

/// Incremental parser of a whole output; feed it deltas with
/// [`push`](Self::push), then call [`finish`](Self::finish).
#[derive(Debug)]
pub struct OutputParser {
    think: Option<ThinkSplitter>,
    inner: Inner,
    reasoning_trim: EdgeTrim,
    text_trim: EdgeTrim,
    calls: usize,
}

impl OutputParser {
    pub fn new(spec: ParserSpec) -> Self {
        let inner = match (spec.format, spec.tools) {
            (ChatFormat::Harmony, _) => Inner::Harmony(HarmonyParser::new()),
            (_, None) => Inner::Plain,
            (ChatFormat::Qwen(_), Some(s)) => Inner::Qwen(ToolCallParser::new(s)),
            (ChatFormat::MiniMax, Some(s)) => Inner::Framed(FramedParser::new(Dialect::MiniMax, s)),
            (ChatFormat::Glm, Some(s)) => Inner::Framed(FramedParser::new(Dialect::Glm, s)),
            (ChatFormat::DeepSeek, Some(s)) => {
                Inner::Framed(FramedParser::new(Dialect::DeepSeek, s))
            }
            (ChatFormat::Dsml, Some(s)) => Inner::Framed(FramedParser::new(Dialect::Dsml, s)),
        };
        Self {
            think: spec.think.then(|| ThinkSplitter::new(spec.in_reasoning)),
            inner,
            reasoning_trim: EdgeTrim::new(),
            text_trim: EdgeTrim::keeping_start(),
            calls: 0,
        }
    }

    /// A parser for output that continues `prefix`, text the server wrote
    /// at the start of the assistant turn ([`ChatFormat::forced_prefix`]),
    /// parsed as if the model had written it; returns the events the prefix
    /// already completes.
    pub fn with_prefix(spec: ParserSpec, prefix: &str) -> (Self, Vec<ToolEvent>) {
        let mut p = Self::new(spec);
        let events = p.push(prefix);
        (p, events)
    }

    /// Tool calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        let mut raw = Vec::new();
        match &mut self.think {
            Some(t) => {
                for piece in t.push(delta) {
                    self.route(piece, &mut raw);
                }
            }
            None => self.inner.push(delta, &mut raw),
        }
        self.polish(raw)
    }

    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut raw = Vec::new();
        if let Some(t) = &mut self.think {
            for piece in t.finish() {
                self.route(piece, &mut raw);
            }
        }
        self.inner.finish(&mut raw);
        let mut out = self.polish(raw);
        self.reasoning_trim.end();
        // Whitespace that ends the output is the model's text.
        out.push(ToolEvent::Text(self.text_trim.flush()));
        merge_text(out)
    }

    fn route(&mut self, piece: Piece, raw: &mut Vec<ToolEvent>) {
        match piece {
            Piece::Reasoning(r) => raw.push(ToolEvent::Reasoning(r)),
            // Tells `polish` that what follows is after reasoning, even
            // when the block was empty.
            Piece::ReasoningEnd => raw.push(ToolEvent::Reasoning(String::new())),
            Piece::Content(c) => self.inner.push(&c, raw),
        }
    }

    /// Trims segment edges and counts calls.
    fn polish(&mut self, raw: Vec<ToolEvent>) -> Vec<ToolEvent> {
        let mut out = Vec::with_capacity(raw.len());
        for ev in raw {
            match ev {
                ToolEvent::Reasoning(r) => {
                    // Text after reasoning starts a new segment.
                    self.text_trim.end();
                    out.push(ToolEvent::Reasoning(self.reasoning_trim.push(&r)))
                }
                ToolEvent::Text(t) => {
                    // Text after reasoning ends the reasoning segment.
                    self.reasoning_trim.end();
                    out.push(ToolEvent::Text(self.text_trim.push(&t)));
                }
                ev @ ToolEvent::CallStart { .. } => {
                    self.calls += 1;
                    self.reasoning_trim.end();
                    self.text_trim.end();
                    out.push(ev);
                }
                ev => out.push(ev),
            }
        }
        merge_text(out)
    }
}

/// Parses a complete output at once.
pub fn parse_all(text: &str, spec: ParserSpec) -> Vec<ToolEvent> {
    let mut p = OutputParser::new(spec);
    let mut events = p.push(text);
    events.extend(p.finish());
    merge_text(events)
}
