//! A request's output constraint -- `response_format`, a forced
//! `tool_choice` -- as grammar text for [`crate::constrain`], with the field
//! to name when it cannot be built.
//!
//! `tool_choice: auto` stays unconstrained (the model decides whether to
//! call). A forced choice keeps the opening the server writes after the
//! generation prompt (`ChatFormat::forced_prefix`: the model continues in the
//! tokens it was trained on), and the grammar, which describes the whole
//! reply, is advanced past it; from there every token is masked to the
//! call syntax and the tool's argument schema.

use serde_json::Value;

use super::error::{ApiError, Flavor};
use super::toolchoice::{Mode, ToolChoice};
use crate::constrain::grammar::{self, CallSyntax, JsonShape, ToolCalls, ToolDef};
use crate::constrain::ConstrainError;
use crate::toolcall::{ChatFormat, ToolForm};

/// A JSON reply, as asked for by `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// `{"type": "json_object"}`: any JSON object.
    JsonObject,
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    JsonSchema { schema: Value, strict: bool },
}

impl ResponseFormat {
    /// OpenAI's `response_format` (`text` is no constraint). `field` names
    /// it in errors: `response_format`, or the Responses API's `text.format`
    /// and Anthropic's `output_config.format`, which spell the schema flat
    /// (`{"type": "json_schema", "schema", "strict"}`).
    pub fn parse(v: Option<&Value>, flavor: Flavor, field: &str) -> Result<Option<Self>, ApiError> {
        let bad = |msg: String| ApiError::bad_request(flavor, msg).param(field);
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Self::JsonObject)),
            Some("json_schema") => {
                let spec = v.get("json_schema").unwrap_or(v);
                let Some(schema) = spec.get("schema").cloned() else {
                    return Err(bad(format!("{field}: a json_schema format needs its `schema`")));
                };
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(bad(format!(
                        "{field}: the schema must be a JSON schema object, got {schema}"
                    )));
                }
                let strict = match spec.get("strict") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(bad(format!(
                            "{field}: `strict` must be a boolean, got {other}"
                        )))
                    }
                };
                Ok(Some(Self::JsonSchema { schema, strict }))
            }
            Some(other) => Err(bad(format!(
                "{field}: type `{other}` is not one of text, json_object, json_schema"
            ))),
            None => Err(bad(format!(
                "{field}: expected an object with a `type` (text, json_object or json_schema), got {v}"
            ))),
        }
    }

    fn shape(&self) -> JsonShape<'_> {
        match self {
            Self::JsonObject => JsonShape::AnyObject,
            Self::JsonSchema { schema, strict } => JsonShape::Schema {
                schema,
                strict: *strict,
            },
        }
    }
}

/// Grammar text and the request field it comes from.
pub struct Constraint {
    pub lark: String,
    pub field: &'static str,
}

/// The constraint of a chat reply, if any. A forced tool call wins over
/// `response_format` (the reply is the call).
pub fn for_chat(
    flavor: Flavor,
    format: ChatFormat,
    choice: &ToolChoice,
    tools: &[Value],
    response_format: Option<&ResponseFormat>,
    in_reasoning: bool,
    special: &[String],
) -> Result<Option<Constraint>, ApiError> {
    if choice.forces_call() {
        let syntax = match format {
            ChatFormat::Qwen(ToolForm::Hermes) => CallSyntax::Hermes,
            ChatFormat::Qwen(ToolForm::Xml) => CallSyntax::QwenXml,
            ChatFormat::Harmony => CallSyntax::Harmony,
            ChatFormat::DeepSeek => CallSyntax::DeepSeek,
            other => {
                return Err(ApiError::bad_request(
                    flavor,
                    format!(
                        "tool_choice: a forced tool call is only supported for the Hermes, Qwen3-Coder XML, gpt-oss harmony and DeepSeek-V3.1 call formats (constrained decoding); this model's chat template uses the {other:?} format; use tool_choice `auto`"
                    ),
                )
                .param("tool_choice"))
            }
        };
        let defs: Vec<ToolDef<'_>> = tools
            .iter()
            .filter_map(ToolDef::from_openai)
            .filter(|t| match &choice.mode {
                Mode::Named(n) => t.name == n,
                _ => true,
            })
            .collect();
        let calls = ToolCalls {
            syntax,
            tools: defs,
            parallel: choice.parallel,
            reasoning: in_reasoning,
            special,
        };
        let lark = grammar::tool_calls(&calls).map_err(|e| to_api(flavor, e, "tools"))?;
        return Ok(Some(Constraint {
            lark,
            field: "tools",
        }));
    }
    Ok(response_format.map(|rf| Constraint {
        lark: grammar::json_reply(rf.shape(), in_reasoning),
        field: "response_format",
    }))
}

/// The constraint of a raw completion (`/v1/completions`).
pub fn for_text(response_format: Option<&ResponseFormat>) -> Option<Constraint> {
    response_format.map(|rf| Constraint {
        lark: grammar::json_reply(rf.shape(), false),
        field: "response_format",
    })
}

/// A constraint that could not be built: the client's request (400, naming
/// `field`) unless the parser itself failed (500).
pub fn to_api(flavor: Flavor, e: ConstrainError, field: &str) -> ApiError {
    match e {
        ConstrainError::Parser(_) => ApiError::new(
            flavor,
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        ),
        ConstrainError::Grammar(m) => ApiError::bad_request(
            flavor,
            format!("{field}: the schema cannot be enforced: {m}"),
        )
        .param(field),
        other => ApiError::bad_request(flavor, format!("{field}: {other}")).param(field),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn response_format_forms() {
        let p = |v: Value| ResponseFormat::parse(Some(&v), Flavor::OpenAi, "response_format");
        assert_eq!(p(json!({"type": "text"})).ok(), Some(None));
        assert_eq!(
            p(json!({"type": "json_object"})).ok(),
            Some(Some(ResponseFormat::JsonObject))
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            p(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}))
                .ok(),
            Some(Some(ResponseFormat::JsonSchema {
                schema: s.clone(),
                strict: true
            }))
        );
        // The Responses API's flat spelling.
        assert_eq!(
            p(json!({"type": "json_schema", "name": "x", "schema": s})).ok(),
            Some(Some(ResponseFormat::JsonSchema {
                schema: s,
                strict: false
            }))
        );
        for bad in [
            json!({"type": "yaml"}),
            json!({"kind": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"schema": 3}}),
            json!({"type": "json_schema", "json_schema": {"name": "no schema"}}),
            json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
        ] {
            let e = p(bad.clone()).expect_err("refused");
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (400, Some("response_format")),
                "{bad}"
            );
        }
    }

    #[test]
    fn forced_calls_need_a_format_with_a_grammar() {
        let tools = vec![json!({"type": "function", "function": {"name": "now"}})];
        let choice = ToolChoice {
            mode: Mode::Required,
            parallel: true,
        };
        let e = for_chat(
            Flavor::OpenAi,
            ChatFormat::MiniMax,
            &choice,
            &tools,
            None,
            false,
            &[],
        )
        .err()
        .expect("refused");
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        assert!(e.message.contains("MiniMax"), "{}", e.message);
        // gpt-oss's harmony calls have a grammar.
        let h = for_chat(
            Flavor::OpenAi,
            ChatFormat::Harmony,
            &choice,
            &tools,
            None,
            false,
            &[],
        )
        .expect("built")
        .expect("constrained");
        assert_eq!(h.field, "tools");
        assert!(h.lark.contains("<|constrain|>"), "{}", h.lark);
        // DeepSeek-V3.1's: its markers as tokens where they are special.
        let sep = "<｜tool▁sep｜>".to_string();
        let d = for_chat(
            Flavor::OpenAi,
            ChatFormat::DeepSeek,
            &choice,
            &tools,
            None,
            false,
            std::slice::from_ref(&sep),
        )
        .expect("built")
        .expect("constrained");
        assert!(d.lark.contains(" <｜tool▁sep｜> "), "{}", d.lark);
        assert!(d.lark.contains("\"<｜tool▁call▁begin｜>\""), "{}", d.lark);
        let c = for_chat(
            Flavor::OpenAi,
            ChatFormat::Qwen(ToolForm::Xml),
            &choice,
            &tools,
            Some(&ResponseFormat::JsonObject),
            false,
            &[],
        )
        .expect("built")
        .expect("constrained");
        assert_eq!(c.field, "tools");
        assert!(c.lark.contains("<function=now>"), "{}", c.lark);
        // auto: only response_format constrains.
        let auto = ToolChoice::default();
        let none = for_chat(
            Flavor::OpenAi,
            ChatFormat::Qwen(ToolForm::Hermes),
            &auto,
            &tools,
            None,
            false,
            &[],
        )
        .expect("ok");
        assert!(none.is_none());
    }
}
