//! A request's constraint as llguidance Lark grammar text.
//!
//! JSON is written the way `json.dumps` writes it (`", "` and `": "`, no
//! other whitespace; `JSON` below): the style models see most, and one that
//! leaves a weak model no room to loop on whitespace. `strict` (OpenAI's
//! flag on `json_schema` and on a function) means "enforce exactly":
//! llguidance then refuses schemas with keywords it cannot enforce; without
//! it such keywords are ignored (llguidance's `lenient`).
//!
//! Tool calls are written in the model's own syntax, the one its chat
//! template teaches and `toolcall/` parses back: Hermes
//! (`<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`) or
//! Qwen3-Coder's XML (`<tool_call>\n<function=NAME>\n<parameter=P>\nV\n</parameter>\n…`).
//! Each call names one of the offered tools and its arguments follow that
//! tool's JSON schema; with `parallel` one or more calls, else exactly one;
//! then the reply ends.

use serde_json::{json, Map, Value};

use super::ConstrainError;

/// The shape of a JSON reply (`response_format`).
#[derive(Debug, Clone, Copy)]
pub enum JsonShape<'a> {
    /// Any JSON object (`json_object`).
    AnyObject,
    /// A value valid under this schema (`json_schema`).
    Schema { schema: &'a Value, strict: bool },
}

/// A tool-call syntax with a grammar here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallSyntax {
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
    Hermes,
    /// Qwen3-Coder: `<tool_call>\n<function=NAME>\n<parameter=P>\nV\n</parameter>\n</function>\n</tool_call>`.
    QwenXml,
    /// gpt-oss harmony, after the prompt's `<|start|>assistant`:
    /// `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS`,
    /// the markers special tokens. One call per reply: the model ends it
    /// with `<|call|>`, an end-of-sequence token, which the grammar's end
    /// allows as it allows every end-of-sequence token.
    Harmony,
    /// DeepSeek-V3.1: `<｜tool▁calls▁begin｜>` then, per call,
    /// `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`, then
    /// `<｜tool▁calls▁end｜>`; markers the tokenizer has as special tokens
    /// are named as tokens ([`ToolCalls::special`]).
    DeepSeek,
}

/// One tool a forced call may name.
#[derive(Debug, Clone, Copy)]
pub struct ToolDef<'a> {
    pub name: &'a str,
    /// The JSON schema of its arguments.
    pub parameters: &'a Value,
    pub strict: bool,
}

impl<'a> ToolDef<'a> {
    /// Reads an OpenAI-shaped tool (`{"type":"function","function":{…}}`)
    /// or a bare function object; `None` without a name.
    pub fn from_openai(tool: &'a Value) -> Option<Self> {
        static OBJECT: Value = Value::Null;
        let f = tool.get("function").unwrap_or(tool);
        Some(Self {
            name: f.get("name")?.as_str()?,
            parameters: f.get("parameters").unwrap_or(&OBJECT),
            strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// A reply that must be tool calls.
#[derive(Debug, Clone)]
pub struct ToolCalls<'a> {
    pub syntax: CallSyntax,
    /// The tools a call may name (just one for a named `tool_choice`).
    pub tools: Vec<ToolDef<'a>>,
    /// More than one call allowed.
    pub parallel: bool,
    /// The prompt leaves a `<think>` block open: the reply may finish it first.
    pub reasoning: bool,
    /// The tokenizer's special tokens. A marker among them is written as a
    /// token reference (`<…>`, matched by token id), otherwise as text: a
    /// text rule could never match the special token the model emits.
    pub special: &'a [String],
}

/// The bytes a Lark string literal stands for, quoted (Lark literals are
/// JSON strings in llguidance).
fn lit(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// llguidance's JSON options, placed in a schema's top-level `x-guidance`.
fn json_options(strict: bool) -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
        "lenient": !strict,
    })
}

/// `schema` with our JSON options (a schema's own `x-guidance` wins).
/// Non-object schemas (`true`) are wrapped.
fn with_options(schema: &Value, strict: bool) -> Value {
    let mut m = match schema {
        Value::Object(m) => m.clone(),
        Value::Null | Value::Bool(true) => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("allOf".into(), json!([other]));
            m
        }
    };
    m.entry("x-guidance")
        .or_insert_with(|| json_options(strict));
    Value::Object(m)
}

/// The largest magnitude an integer without bounds may have here: 15
/// digits (exact in a float64; llama.cpp's JSON grammars also stop at 16).
/// Without a bound the number lexeme is unbounded, and a weak model asked
/// for an optional integer (Codex's `max_output_tokens`) wrote digits until
/// the context was full.
const INT_BOUND: f64 = 999_999_999_999_999.0;

/// `schema` with [`INT_BOUND`] on every integer that has no bound of its
/// own (`minimum`/`maximum`, exclusive or not), at any depth. Values
/// (`const`, `enum`, `default`, `examples`) are left alone.
fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            let is_int = match m.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(a)) => a.iter().any(|t| t == "integer"),
                _ => false,
            };
            if is_int {
                if !m.contains_key("minimum") && !m.contains_key("exclusiveMinimum") {
                    m.insert("minimum".into(), json!(-INT_BOUND));
                }
                if !m.contains_key("maximum") && !m.contains_key("exclusiveMaximum") {
                    m.insert("maximum".into(), json!(INT_BOUND));
                }
            }
            for (k, v) in m.iter_mut() {
                if !matches!(k.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_integers(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

/// `%json {…}` for `schema`, carrying `defs` (a tool's `$defs` /
/// `definitions`, which its `#/$defs/…` references point at) at its root.
fn json_rule(schema: &Value, defs: &Map<String, Value>, strict: bool) -> String {
    let mut s = with_options(schema, strict);
    bound_integers(&mut s);
    if let Value::Object(m) = &mut s {
        for (k, v) in defs {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    format!("%json {s}")
}

/// A schema's `$defs` and `definitions` (the roots of its local references).
fn defs_of(schema: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for key in ["$defs", "definitions"] {
        if let Some(v) = schema.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    out
}

/// Reasoning that finishes the `<think>` block the prompt left open: any
/// text without `</think>`, then `</think>` and the newlines templates put
/// after it, as one lexeme (see `xml_text`). Required: the block must close
/// before the constrained part (a forced call's opening closes it at once).
const REASONING: &str = r#"REASONING: THINK_BODY "</think>" /\n*/
THINK_BODY: /(?s:.*)/ & ~/(?s:.*)<\/think>(?s:.*)/
"#;

/// The grammar of a JSON reply.
pub fn json_reply(shape: JsonShape<'_>, reasoning: bool) -> String {
    let body = match shape {
        JsonShape::AnyObject => json_rule(&json!({"type": "object"}), &Map::new(), true),
        JsonShape::Schema { schema, strict } => json_rule(schema, &Map::new(), strict),
    };
    if reasoning {
        format!("start: REASONING value\nvalue: {body}\n{REASONING}")
    } else {
        format!("start: value\nvalue: {body}\n")
    }
}

/// The grammar of a reply made of tool calls.
pub fn tool_calls(t: &ToolCalls<'_>) -> Result<String, ConstrainError> {
    if t.tools.is_empty() {
        return Err(ConstrainError::Unsupported(
            "a tool call was required but no tool was offered".into(),
        ));
    }
    match t.syntax {
        CallSyntax::Hermes => tagged_calls(t, "\n</tool_call>", |g, i, tool| {
            hermes_tool(g, i, tool);
            Ok(())
        }),
        CallSyntax::QwenXml => tagged_calls(t, "</tool_call>", xml_tool),
        CallSyntax::Harmony => Ok(harmony_call(t)),
        CallSyntax::DeepSeek => deepseek_calls(t),
    }
}

/// A format marker as a grammar term: a token reference when the
/// tokenizer has it as a special token, else its text.
fn mark(t: &ToolCalls<'_>, m: &str) -> String {
    if t.special.iter().any(|s| s == m) {
        m.to_owned()
    } else {
        lit(m)
    }
}

/// DeepSeek-V3.1's calls ([`CallSyntax::DeepSeek`]), each tool's arguments
/// as one JSON value under its schema, as the template writes them.
fn deepseek_calls(t: &ToolCalls<'_>) -> Result<String, ConstrainError> {
    const CALLS_OPEN: &str = "<｜tool▁calls▁begin｜>";
    const CALLS_CLOSE: &str = "<｜tool▁calls▁end｜>";
    const CALL_OPEN: &str = "<｜tool▁call▁begin｜>";
    const CALL_CLOSE: &str = "<｜tool▁call▁end｜>";
    const SEP: &str = "<｜tool▁sep｜>";
    let reasoning = if t.reasoning {
        // REASONING is one lexeme ending in the text `</think>`; a special
        // `</think>` cannot end a lexeme, so that case is refused.
        if t.special.iter().any(|s| s == "</think>") {
            return Err(ConstrainError::Unsupported(
                "a forced call after an open <think> block whose end is a special token".into(),
            ));
        }
        "REASONING "
    } else {
        ""
    };
    let mut g = format!(
        "start: {reasoning}{} {} {}
",
        mark(t, CALLS_OPEN),
        if t.parallel { "call+" } else { "call" },
        mark(t, CALLS_CLOSE)
    );
    g.push_str(&format!(
        "call: {} ({}) {}
",
        mark(t, CALL_OPEN),
        alternatives(t),
        mark(t, CALL_CLOSE)
    ));
    for (i, tool) in t.tools.iter().enumerate() {
        let params = arguments_schema(tool);
        g.push_str(&format!(
            "t{i}: {} {} a{i}
a{i}: {}
",
            lit(tool.name),
            mark(t, SEP),
            json_rule(&params, &defs_of(&params), tool.strict)
        ));
    }
    if t.reasoning {
        g.push_str(REASONING);
    }
    Ok(g)
}

/// `t0 | t1 | …`: one grammar rule per offered tool.
fn alternatives(t: &ToolCalls<'_>) -> String {
    let alts: Vec<String> = (0..t.tools.len()).map(|i| format!("t{i}")).collect();
    alts.join(" | ")
}

/// Calls each wrapped in `<tool_call>\n` … `close` (the Qwen forms), one
/// rule `t{i}` per tool written by `tool_rule`, on new lines when parallel.
fn tagged_calls(
    t: &ToolCalls<'_>,
    close: &str,
    tool_rule: impl Fn(&mut String, usize, &ToolDef<'_>) -> Result<(), ConstrainError>,
) -> Result<String, ConstrainError> {
    let mut g = String::new();
    g.push_str(if t.reasoning {
        "start: REASONING calls\n"
    } else {
        "start: calls\n"
    });
    // Calls follow each other on new lines, as the templates render them.
    g.push_str(if t.parallel {
        "calls: call (\"\\n\" call)*\n"
    } else {
        "calls: call\n"
    });
    g.push_str(&format!(
        "call: {} ({}) {}\n",
        lit("<tool_call>\n"),
        alternatives(t),
        lit(close)
    ));
    for (i, tool) in t.tools.iter().enumerate() {
        tool_rule(&mut g, i, tool)?;
    }
    if t.reasoning {
        g.push_str(REASONING);
    }
    Ok(g)
}

/// A tool's argument schema; a tool without one takes any object.
fn arguments_schema(tool: &ToolDef<'_>) -> Value {
    match tool.parameters {
        Value::Null => json!({"type": "object"}),
        p => p.clone(),
    }
}

/// One harmony tool call. The markers are special tokens (`<|…|>` in a
/// rule, which llguidance matches by token, never by text). No reasoning
/// before it: the forced prefix starts the commentary header at once, as
/// `<tool_call>` does for Qwen. Harmony has no parallel calls in one reply:
/// `<|call|>` ends generation.
fn harmony_call(t: &ToolCalls<'_>) -> String {
    let mut g = format!(
        "start: <|channel|> {} ({})\n",
        lit("commentary to=functions."),
        alternatives(t)
    );
    for (i, tool) in t.tools.iter().enumerate() {
        let params = arguments_schema(tool);
        g.push_str(&format!(
            "t{i}: {} <|constrain|> {} <|message|> a{i}\na{i}: {}\n",
            lit(&format!("{} ", tool.name)),
            lit("json"),
            json_rule(&params, &defs_of(&params), tool.strict)
        ));
    }
    g
}

/// `{"name": NAME, "arguments": ARGS}` as one JSON schema.
fn hermes_tool(g: &mut String, i: usize, tool: &ToolDef<'_>) {
    let params = arguments_schema(tool);
    let defs = defs_of(&params);
    let call = json!({
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": params,
        },
        "required": ["name", "arguments"],
        "additionalProperties": false,
    });
    g.push_str(&format!("t{i}: {}\n", json_rule(&call, &defs, tool.strict)));
}

/// The XML parser's type of a parameter (`toolcall::ToolSchemas`): the
/// schema's `type`, the first non-null one of a list, `string` when absent.
fn xml_type(schema: &Value) -> &str {
    match schema.get("type") {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("string"),
        _ => "string",
    }
}

/// What ends an XML parameter's value.
const PARAM_TAIL: &str = "\n</parameter>\n";

/// `<function=NAME>\n` then each parameter (required ones always, in the
/// schema's order) then `</function>\n`.
fn xml_tool(g: &mut String, i: usize, tool: &ToolDef<'_>) -> Result<(), ConstrainError> {
    let params = tool.parameters;
    let defs = defs_of(params);
    let required: Vec<&str> = params
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let props = params.get("properties").and_then(Value::as_object);
    let mut seq = vec![lit(&format!("<function={}>\n", tool.name))];
    for (j, (key, schema)) in props.into_iter().flatten().enumerate() {
        let rule = format!("t{i}p{j}");
        let head = lit(&format!("<parameter={key}>\n"));
        let value = if xml_type(schema) == "string" {
            xml_text(g, &rule, key, tool, schema)?
        } else if let Some(rx) = plain_number(schema) {
            let name = rule.to_uppercase();
            g.push_str(&format!("{name}_NUM: /{rx}/\n"));
            format!("{name}_NUM {}", lit(PARAM_TAIL))
        } else {
            g.push_str(&format!(
                "{rule}v: {}\n",
                json_rule(schema, &defs, tool.strict)
            ));
            format!("{rule}v {}", lit(PARAM_TAIL))
        };
        g.push_str(&format!("{rule}: {head} {value}\n"));
        seq.push(if required.contains(&key.as_str()) {
            rule
        } else {
            format!("{rule}?")
        });
    }
    seq.push(lit("</function>\n"));
    g.push_str(&format!("t{i}: {}\n", seq.join(" ")));
    Ok(())
}

/// A bounded number lexeme for a parameter that is just a number (`type`
/// `integer` or `number` and nothing but annotations): at most 15 integer
/// digits (see [`INT_BOUND`]), 15 fraction digits and a 3-digit exponent.
/// llguidance's own float lexeme has no length limit, even with bounds, so
/// a model could write digits forever; numbers with bounds or `multipleOf`
/// keep llguidance's exact rule (integers there are bounded by
/// [`bound_integers`]).
fn plain_number(schema: &Value) -> Option<&'static str> {
    const ANNOTATIONS: [&str; 8] = [
        "type",
        "description",
        "title",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "$comment",
    ];
    let m = schema.as_object()?;
    if !m.keys().all(|k| ANNOTATIONS.contains(&k.as_str())) {
        return None;
    }
    match m.get("type")?.as_str()? {
        "integer" => Some(r"-?(0|[1-9][0-9]{0,14})"),
        "number" => Some(r"-?(0|[1-9][0-9]{0,14})(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,3})?"),
        _ => None,
    }
}

/// A string parameter's value as XML text: the template writes it raw, so
/// it may hold anything but `</parameter>`. `enum`/`const` become the
/// literal choices, `minLength`/`maxLength` a length bound; `pattern` and
/// `format` cannot be checked on raw text and are refused under `strict`.
fn xml_text(
    g: &mut String,
    rule: &str,
    key: &str,
    tool: &ToolDef<'_>,
    schema: &Value,
) -> Result<String, ConstrainError> {
    let choices: Option<Vec<&Value>> = match (schema.get("const"), schema.get("enum")) {
        (Some(c), _) => Some(vec![c]),
        (None, Some(Value::Array(a))) => Some(a.iter().collect()),
        _ => None,
    };
    if let Some(choices) = choices {
        let strings: Vec<String> = choices.iter().filter_map(|v| v.as_str()).map(lit).collect();
        if strings.is_empty() {
            return Err(ConstrainError::Unsupported(format!(
                "tool `{}`, parameter `{key}`: its allowed values are not strings, which this model's XML call syntax cannot write as the schema's type",
                tool.name
            )));
        }
        return Ok(format!("({}) {}", strings.join(" | "), lit(PARAM_TAIL)));
    }
    if tool.strict {
        for kw in ["pattern", "format"] {
            if schema.get(kw).is_some() {
                return Err(ConstrainError::Unsupported(format!(
                    "tool `{}`, parameter `{key}`: `{kw}` cannot be enforced on this model's XML call syntax (raw text values); drop it or set `strict` false",
                    tool.name
                )));
            }
        }
    }
    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
    let max = schema.get("maxLength").and_then(Value::as_u64);
    let name = rule.to_uppercase();
    let len = match max {
        Some(max) => format!("{{{min},{max}}}"),
        None => format!("{{{min},}}"),
    };
    // One terminal for the text and its closing tag: a lexeme ends where
    // it cannot grow, so a separate text lexeme would swallow the start of
    // `\n</parameter>` and never give it back. Besides `</parameter>`, the
    // text may not hold what the streaming parser takes for the next tag
    // when `</parameter>` is missing (`\n<parameter=`, `\n</function>`,
    // or either at its very start): text the grammar allows must parse back
    // as this one value, not as extra (unoffered, repeated) parameters.
    g.push_str(&format!(
        "{name}_TEXT: /(?s:.){len}/ & ~/(?s:.*)(<\\/parameter>|\\n<parameter=|\\n<\\/function>)(?s:.*)/ & ~/(<parameter=|<\\/function>)(?s:.*)/\n{name}_VAL: {name}_TEXT {}\n",
        lit(PARAM_TAIL)
    ));
    Ok(format!("{name}_VAL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_json_strings() {
        assert_eq!(lit("a\n\"b\""), r#""a\n\"b\"""#);
    }

    #[test]
    fn a_schemas_own_options_win() {
        let s = with_options(&json!({"x-guidance": {"lenient": true}}), true);
        assert_eq!(s["x-guidance"], json!({"lenient": true}));
        let s = with_options(&json!({"type": "object"}), true);
        assert_eq!(s["x-guidance"]["lenient"], false);
        assert_eq!(
            with_options(&json!(true), false)["x-guidance"]["lenient"],
            true
        );
    }

    #[test]
    fn xml_types_follow_the_parser() {
        assert_eq!(xml_type(&json!({"type": ["null", "integer"]})), "integer");
        assert_eq!(xml_type(&json!({"enum": [1, 2]})), "string");
    }
}
