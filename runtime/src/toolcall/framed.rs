//! Tool calls written as tagged blocks: MiniMax-M2, GLM-4.5+, DeepSeek-V3.1
//! and DeepSeek-V3.2's DSML.
//!
//! * MiniMax-M2: `<minimax:tool_call>\n<invoke name="N">\n<parameter name="K">V</parameter>\n</invoke>\n</minimax:tool_call>`
//! * DeepSeek-V3.2 (DSML): the same shape with `｜DSML｜`-prefixed tags and a
//!   `string="true|false"` attribute on each parameter.
//! * GLM-4.5/4.6/4.7: `<tool_call>N\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>`
//!   (4.7 without the newlines).
//! * DeepSeek-V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{JSON}<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
//!
//! All four wrap one or more calls, each with a clear end tag, so a call is
//! emitted whole when its end tag arrives. Parameter values of the XML-ish
//! forms are untyped text, typed from the tool's JSON schema as for
//! Qwen3-Coder (`string` stays text, anything else is parsed as JSON and
//! falls back to text); DSML says which with its `string` attribute.

use serde_json::{Map, Value as Json};

use super::{partial_tag_len, typed_by_schema, ToolEvent, ToolSchemas};

/// Which block form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MiniMax,
    Glm,
    DeepSeek,
    Dsml,
}

pub(super) const MINIMAX_OPEN: &str = "<minimax:tool_call>";
const MINIMAX_CLOSE: &str = "</minimax:tool_call>";
pub(super) const GLM_OPEN: &str = "<tool_call>";
const GLM_CLOSE: &str = "</tool_call>";
pub(super) const DS_CALLS_OPEN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_CLOSE: &str = "<｜tool▁calls▁end｜>";
pub(super) const DS_CALL_OPEN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_CLOSE: &str = "<｜tool▁call▁end｜>";
pub(super) const DS_SEP: &str = "<｜tool▁sep｜>";
pub(super) const DSML_OPEN: &str = "<｜DSML｜function_calls>";
const DSML_CLOSE: &str = "</｜DSML｜function_calls>";
pub(super) const DSML_INVOKE: &str = "<｜DSML｜invoke name=\"";
const DSML_INVOKE_CLOSE: &str = "</｜DSML｜invoke>";
const DSML_PARAM: &str = "<｜DSML｜parameter name=\"";
const DSML_PARAM_CLOSE: &str = "</｜DSML｜parameter>";
pub(super) const MINIMAX_INVOKE: &str = "<invoke name=\"";
const MINIMAX_INVOKE_CLOSE: &str = "</invoke>";
const MINIMAX_PARAM: &str = "<parameter name=\"";
const MINIMAX_PARAM_CLOSE: &str = "</parameter>";

struct Framing {
    /// The tag around a group of calls, if the form has one.
    block: Option<(&'static str, &'static str)>,
    /// The tags around one call.
    call: (&'static str, &'static str),
}

impl Dialect {
    fn framing(self) -> Framing {
        match self {
            Self::MiniMax => Framing {
                block: Some((MINIMAX_OPEN, MINIMAX_CLOSE)),
                call: (MINIMAX_INVOKE, MINIMAX_INVOKE_CLOSE),
            },
            Self::Dsml => Framing {
                block: Some((DSML_OPEN, DSML_CLOSE)),
                call: (DSML_INVOKE, DSML_INVOKE_CLOSE),
            },
            Self::Glm => Framing {
                block: None,
                call: (GLM_OPEN, GLM_CLOSE),
            },
            Self::DeepSeek => Framing {
                block: Some((DS_CALLS_OPEN, DS_CALLS_CLOSE)),
                call: (DS_CALL_OPEN, DS_CALL_CLOSE),
            },
        }
    }

    /// The name and arguments of one call's body (the text between the
    /// call tags); `None` if it is not a call. A body cut off by the end of
    /// generation keeps its complete parameters.
    fn parse_call(self, body: &str, schemas: &ToolSchemas) -> Option<(String, Json)> {
        match self {
            Self::MiniMax => parse_invoke(body, MINIMAX_PARAM, MINIMAX_PARAM_CLOSE, schemas),
            Self::Dsml => parse_invoke(body, DSML_PARAM, DSML_PARAM_CLOSE, schemas),
            Self::Glm => parse_glm(body, schemas),
            Self::DeepSeek => parse_deepseek(body),
        }
    }
}

/// A parameter's raw text as JSON: `string` says what DSML declared, else
/// the schema decides.
fn typed(raw: &str, string: Option<bool>, schema_type: Option<&str>) -> Json {
    match string {
        Some(true) => Json::String(raw.into()),
        Some(false) => {
            serde_json::from_str(raw.trim()).unwrap_or_else(|_| typed_by_schema(raw, schema_type))
        }
        None => typed_by_schema(raw, schema_type),
    }
}

/// `N">` then `<parameter name="K"[ string="…"]>V</parameter>`s.
fn parse_invoke(
    body: &str,
    param_open: &str,
    param_close: &str,
    schemas: &ToolSchemas,
) -> Option<(String, Json)> {
    let (name, mut rest) = body.split_once("\">")?;
    let name = name.trim().to_owned();
    if name.is_empty() || name.contains('<') {
        return None;
    }
    let mut args = Map::new();
    while let Some(p) = rest.find(param_open) {
        let after = &rest[p + param_open.len()..];
        let Some(head_end) = after.find('>') else {
            break;
        };
        let head = &after[..head_end];
        let key = head.split('"').next().unwrap_or("").to_owned();
        let string = if head.contains("string=\"true\"") {
            Some(true)
        } else if head.contains("string=\"false\"") {
            Some(false)
        } else {
            None
        };
        let after = &after[head_end + 1..];
        let Some(end) = after.find(param_close) else {
            break;
        };
        let value = typed(&after[..end], string, schemas.type_of(&name, &key));
        args.insert(key, value);
        rest = &after[end + param_close.len()..];
    }
    Some((name, Json::Object(args)))
}

/// `N` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs.
fn parse_glm(body: &str, schemas: &ToolSchemas) -> Option<(String, Json)> {
    const KEY: &str = "<arg_key>";
    const KEY_END: &str = "</arg_key>";
    const VAL: &str = "<arg_value>";
    const VAL_END: &str = "</arg_value>";
    let name_end = body.find(KEY).unwrap_or(body.len());
    let name = body[..name_end].trim().to_owned();
    if name.is_empty() || name.contains(['<', '\n', '{']) {
        return None;
    }
    let mut args = Map::new();
    let mut rest = &body[name_end..];
    while let Some(p) = rest.find(KEY) {
        let after = &rest[p + KEY.len()..];
        let Some(k_end) = after.find(KEY_END) else {
            break;
        };
        let key = after[..k_end].trim().to_owned();
        let after = &after[k_end + KEY_END.len()..];
        let Some(v) = after.find(VAL) else {
            break;
        };
        let after = &after[v + VAL.len()..];
        let Some(v_end) = after.find(VAL_END) else {
            break;
        };
        args.insert(
            key.clone(),
            typed(&after[..v_end], None, schemas.type_of(&name, &key)),
        );
        rest = &after[v_end + VAL_END.len()..];
    }
    Some((name, Json::Object(args)))
}

/// `N<｜tool▁sep｜>{JSON}`, or DeepSeek-V3's older
/// `function<｜tool▁sep｜>N\n```json\n{JSON}\n```` form.
fn parse_deepseek(body: &str) -> Option<(String, Json)> {
    let (name, args) = body.split_once(DS_SEP)?;
    let (name, args) = match args.split_once("```json") {
        Some((n, rest)) if name.trim() == "function" => {
            (n.trim(), rest.rsplit_once("```").map_or(rest, |(a, _)| a))
        }
        _ => (name.trim(), args),
    };
    if name.is_empty() {
        return None;
    }
    let args = match serde_json::from_str::<Json>(args.trim()).ok()? {
        Json::Null => Json::Object(Map::new()),
        obj @ Json::Object(_) => obj,
        _ => return None,
    };
    Some((name.to_owned(), args))
}

#[derive(Debug, PartialEq)]
enum State {
    Text,
    /// Inside a group of calls, between calls.
    Block,
    /// Inside one call, collecting its body.
    Call,
}

/// Incremental parser for one [`Dialect`].
#[derive(Debug)]
pub(super) struct FramedParser {
    dialect: Dialect,
    schemas: ToolSchemas,
    state: State,
    buf: String,
    calls: usize,
}

impl FramedParser {
    pub fn new(dialect: Dialect, schemas: ToolSchemas) -> Self {
        Self {
            dialect,
            schemas,
            state: State::Text,
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
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => out.push(ToolEvent::Text(rest)),
            // Between calls: only the closing tag is missing.
            State::Block => {}
            State::Call => self.emit(&rest, false, out),
        }
    }

    fn step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        let f = self.dialect.framing();
        match self.state {
            State::Text => {
                let open = f.block.map_or(f.call.0, |b| b.0);
                if let Some(p) = self.buf.find(open) {
                    out.push(ToolEvent::Text(self.buf[..p].to_owned()));
                    self.buf.drain(..p + open.len());
                    self.state = if f.block.is_some() {
                        State::Block
                    } else {
                        State::Call
                    };
                    return true;
                }
                let keep = partial_tag_len(&self.buf, open);
                let release = self.buf.len() - keep;
                out.push(ToolEvent::Text(self.buf[..release].to_owned()));
                self.buf.drain(..release);
                false
            }
            State::Block => {
                let (open, close) = f.block.expect("Block state only with a block form");
                let lead = self.buf.len() - self.buf.trim_start().len();
                let rest = &self.buf[lead..];
                if rest.starts_with(f.call.0) {
                    self.buf.drain(..lead + f.call.0.len());
                    self.state = State::Call;
                    return true;
                }
                if rest.starts_with(close) {
                    self.buf.drain(..lead + close.len());
                    self.state = State::Text;
                    return true;
                }
                if rest.is_empty() || f.call.0.starts_with(rest) || close.starts_with(rest) {
                    return false;
                }
                // Stray text between calls: skip to the next tag we know.
                let next = [f.call.0, close, open]
                    .iter()
                    .filter_map(|t| rest.find(t))
                    .min();
                match next {
                    Some(p) => {
                        self.buf.drain(..lead + p);
                        true
                    }
                    None => false,
                }
            }
            State::Call => {
                let Some(p) = self.buf.find(f.call.1) else {
                    return false;
                };
                let body = self.buf[..p].to_owned();
                self.buf.drain(..p + f.call.1.len());
                self.state = if f.block.is_some() {
                    State::Block
                } else {
                    State::Text
                };
                self.emit(&body, true, out);
                true
            }
        }
    }

    /// Emits one call, or gives its text back if it is not one.
    fn emit(&mut self, body: &str, closed: bool, out: &mut Vec<ToolEvent>) {
        match self.dialect.parse_call(body, &self.schemas) {
            Some((name, args)) => {
                let index = self.calls;
                self.calls += 1;
                out.push(ToolEvent::CallStart { index, name });
                out.push(ToolEvent::ArgsDelta {
                    index,
                    json: args.to_string(),
                });
                out.push(ToolEvent::CallEnd { index });
            }
            None => {
                let f = self.dialect.framing();
                let close = if closed { f.call.1 } else { "" };
                out.push(ToolEvent::Text(format!("{}{body}{close}", f.call.0)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::{collect, merge_text};
    use serde_json::json;

    fn schemas() -> ToolSchemas {
        ToolSchemas::from_openai_tools(&[json!({"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                "s": {"type": "string"}, "n": {"type": "integer"}, "o": {"type": "object"}}}}})])
    }

    fn parse(d: Dialect, text: &str, n: usize) -> Vec<ToolEvent> {
        let mut p = FramedParser::new(d, schemas());
        let mut out = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for c in chars.chunks(n) {
            p.push(&c.iter().collect::<String>(), &mut out);
        }
        p.finish(&mut out);
        merge_text(out)
    }

    #[test]
    fn each_dialect_types_its_values() {
        let cases = [
            (Dialect::MiniMax, "a<minimax:tool_call>\n<invoke name=\"f\">\n<parameter name=\"s\">12</parameter>\n<parameter name=\"n\">12</parameter>\n<parameter name=\"o\">{\"k\": [1]}</parameter>\n</invoke>\n</minimax:tool_call>b"),
            (Dialect::Dsml, "a<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"s\" string=\"true\">12</｜DSML｜parameter>\n<｜DSML｜parameter name=\"n\" string=\"false\">12</｜DSML｜parameter>\n<｜DSML｜parameter name=\"o\" string=\"false\">{\"k\": [1]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>b"),
            (Dialect::Glm, "a<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>12</arg_value>\n<arg_key>n</arg_key>\n<arg_value>12</arg_value><arg_key>o</arg_key><arg_value>{\"k\": [1]}</arg_value>\n</tool_call>b"),
            (Dialect::DeepSeek, "a<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"s\": \"12\", \"n\": 12, \"o\": {\"k\": [1]}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>b"),
        ];
        for (d, text) in cases {
            for n in [1, 2, 3, 1000] {
                let (t, calls) = collect(&parse(d, text, n));
                assert_eq!(t, "ab", "{d:?} chunk {n}");
                assert_eq!(calls.len(), 1, "{d:?} chunk {n}");
                assert_eq!(calls[0].name, "f");
                let args: Json = serde_json::from_str(&calls[0].arguments).expect("json");
                assert_eq!(args, json!({"s": "12", "n": 12, "o": {"k": [1]}}), "{d:?}");
            }
        }
    }

    #[test]
    fn broken_calls_come_back_as_text_and_cut_off_ones_keep_whole_parameters() {
        let bad = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (t, calls) = collect(&parse(Dialect::DeepSeek, bad, 3));
        assert!(calls.is_empty());
        assert_eq!(
            t,
            "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜>"
        );
        let cut = "<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>3</arg_value>\n<arg_key>s</arg_key>\n<arg_value>hal";
        let (_, calls) = collect(&parse(Dialect::Glm, cut, 2));
        assert_eq!(calls[0].arguments, json!({"n": 3}).to_string());
        // A GLM `<tool_call>` followed by Hermes JSON is not a GLM call.
        let (t, calls) = collect(&parse(
            Dialect::Glm,
            "<tool_call>{\"name\": \"f\"}</tool_call>",
            4,
        ));
        assert!(calls.is_empty());
        assert_eq!(t, "<tool_call>{\"name\": \"f\"}</tool_call>");
    }
}
