//! `tool_choice` in both providers' shapes, resolved against `tools`.
//!
//! The sampler is plain (no grammar), so "the model must call a tool" is
//! made true the one way a plain sampler allows: the server writes the start
//! of the call itself, after the template's generation prompt, and the model
//! continues it (see [`crate::toolcall::ToolForm::forced_prefix`]). A named
//! function (or the only tool offered) is written out in full, so the call is
//! to that function whatever the model does next; with several tools and
//! "required"/"any" the model picks the name. What the model writes as
//! arguments is its own: a weak model may write poor ones.

use serde_json::Value;

use super::error::{ApiError, Flavor};

/// Whether and how the reply must use a tool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// The model decides (OpenAI "auto", Anthropic `auto`).
    #[default]
    Auto,
    /// No tools: they are left out of the prompt and the output is not parsed.
    None,
    /// At least one call, to any of the tools (OpenAI "required", Anthropic `any`).
    Required,
    /// A call to this function (OpenAI `{"type":"function",…}`, Anthropic `tool`).
    Named(String),
}

/// A resolved `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolChoice {
    pub mode: Mode,
    /// More than one call per reply (OpenAI `parallel_tool_calls`, the
    /// opposite of Anthropic's `disable_parallel_tool_use`). When false the
    /// generation is ended as soon as the first call is complete.
    pub parallel: bool,
}

impl Default for ToolChoice {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            parallel: true,
        }
    }
}

impl ToolChoice {
    /// The function name the server writes into the forced call, if any.
    /// "required" with a single tool is the same as naming it.
    pub fn forced_name<'a>(&'a self, tools: &'a [Value]) -> Option<&'a str> {
        match &self.mode {
            Mode::Named(n) => Some(n),
            Mode::Required if tools.len() == 1 => tool_name(&tools[0]),
            _ => None,
        }
    }

    /// True when the reply must start with a call.
    pub fn forces_call(&self) -> bool {
        matches!(self.mode, Mode::Required | Mode::Named(_))
    }
}

/// The name of an OpenAI-shaped tool (`{"type":"function","function":{"name"}}`).
pub fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

/// OpenAI: `"none" | "auto" | "required" | {"type":"function","function":{"name"}}`
/// (the Responses API's flat `{"type":"function","name"}` is accepted too),
/// with `parallel_tool_calls`.
pub fn from_openai(
    choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
    tools: &[Value],
) -> Result<ToolChoice, ApiError> {
    let f = Flavor::OpenAi;
    let bad = |msg: String| ApiError::bad_request(f, msg).param("tool_choice");
    let mode = match choice {
        None | Some(Value::Null) => Mode::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Mode::Auto,
            "none" => Mode::None,
            "required" => Mode::Required,
            other => {
                return Err(bad(format!(
                    "tool_choice `{other}` is not one of \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                )))
            }
        },
        Some(v @ Value::Object(_)) => {
            if v.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(format!(
                    "tool_choice object must have \"type\": \"function\", got {}",
                    v.get("type").unwrap_or(&Value::Null)
                )));
            }
            let name = v
                .pointer("/function/name")
                .or_else(|| v.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice needs `function.name`".into()))?;
            Mode::Named(name.to_owned())
        }
        Some(other) => {
            return Err(bad(format!(
                "tool_choice must be a string or an object, got {other}"
            )))
        }
    };
    let choice = ToolChoice {
        mode,
        parallel: parallel_tool_calls.unwrap_or(true),
    };
    check(f, &choice, tools, "tool_choice", "tools")?;
    Ok(choice)
}

/// Anthropic: `{"type": "auto"|"any"|"tool"|"none", "name", "disable_parallel_tool_use"}`.
pub fn from_anthropic(choice: Option<&Value>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let f = Flavor::Anthropic;
    let Some(v) = choice.filter(|v| !v.is_null()) else {
        return Ok(ToolChoice::default());
    };
    let bad = |msg: String| ApiError::bad_request(f, msg).param("tool_choice");
    let Some(obj) = v.as_object() else {
        return Err(bad(format!(
            "tool_choice: expected an object such as {{\"type\": \"auto\"}}, got {v}"
        )));
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let mode = match kind {
        "auto" => Mode::Auto,
        "none" => Mode::None,
        "any" => Mode::Required,
        "tool" => {
            let name = obj.get("name").and_then(Value::as_str).ok_or_else(|| {
                bad("tool_choice.name: required when tool_choice.type is `tool`".into())
            })?;
            Mode::Named(name.to_owned())
        }
        other => {
            return Err(bad(format!(
                "tool_choice.type: `{other}` is not one of auto, any, tool, none"
            )))
        }
    };
    let disable = match obj.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!(
                "tool_choice.disable_parallel_tool_use: expected a boolean, got {other}"
            )))
        }
    };
    let choice = ToolChoice {
        mode,
        parallel: !disable,
    };
    check(f, &choice, tools, "tool_choice.name", "tools")?;
    Ok(choice)
}

/// A forced call needs tools, and a named one must be among them.
fn check(
    f: Flavor,
    choice: &ToolChoice,
    tools: &[Value],
    name_field: &str,
    tools_field: &str,
) -> Result<(), ApiError> {
    if choice.forces_call() && tools.is_empty() {
        return Err(ApiError::bad_request(
            f,
            format!(
                "{name_field}: a tool call was required, but `{tools_field}` is empty or missing"
            ),
        )
        .param("tool_choice"));
    }
    if let Mode::Named(name) = &choice.mode {
        if !tools.iter().any(|t| tool_name(t) == Some(name.as_str())) {
            let offered: Vec<&str> = tools.iter().filter_map(tool_name).collect();
            return Err(ApiError::bad_request(
                f,
                format!(
                    "{name_field}: no tool named `{name}` in `{tools_field}` (offered: {})",
                    offered.join(", ")
                ),
            )
            .param("tool_choice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather"}}),
            json!({"type": "function", "function": {"name": "now"}}),
        ]
    }

    #[test]
    fn openai_forms() {
        let t = tools();
        let mode = |v: Value| from_openai(Some(&v), None, &t).map(|c| c.mode);
        assert_eq!(mode(json!("auto")).ok(), Some(Mode::Auto));
        assert_eq!(mode(json!("none")).ok(), Some(Mode::None));
        assert_eq!(mode(json!("required")).ok(), Some(Mode::Required));
        assert_eq!(
            mode(json!({"type": "function", "function": {"name": "now"}})).ok(),
            Some(Mode::Named("now".into()))
        );
        assert_eq!(
            mode(json!({"type": "function", "name": "now"})).ok(),
            Some(Mode::Named("now".into()))
        );
        let e = mode(json!({"type": "function", "function": {"name": "nope"}})).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        assert!(e.message.contains("`nope`") && e.message.contains("get_weather, now"));
        assert!(mode(json!("sometimes")).is_err());
        assert!(mode(json!({"type": "tool"})).is_err());
        assert!(mode(json!(3)).is_err());
        assert!(from_openai(Some(&json!("required")), None, &[]).is_err());
        assert!(from_openai(None, Some(false), &t).is_ok_and(|c| !c.parallel));
        assert!(from_openai(None, None, &[]).is_ok_and(|c| c.parallel && c.mode == Mode::Auto));
    }

    #[test]
    fn anthropic_forms() {
        let t = tools();
        let get = |v: Value| from_anthropic(Some(&v), &t);
        assert_eq!(
            get(json!({"type": "any"})).map(|c| c.mode).ok(),
            Some(Mode::Required)
        );
        let c =
            get(json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}))
                .expect("valid");
        assert_eq!(c.mode, Mode::Named("get_weather".into()));
        assert!(!c.parallel);
        assert!(get(json!({"type": "auto"})).is_ok_and(|c| c.parallel));
        assert_eq!(
            get(json!({"type": "none"})).map(|c| c.mode).ok(),
            Some(Mode::None)
        );
        let e = get(json!({"type": "tool", "name": "nope"})).unwrap_err();
        assert_eq!((e.flavor, e.status.as_u16()), (Flavor::Anthropic, 400));
        assert!(get(json!({"type": "tool"})).is_err());
        assert!(get(json!({"type": "function"})).is_err());
        assert!(get(json!("auto")).is_err());
        assert!(get(json!({"type": "auto", "disable_parallel_tool_use": "yes"})).is_err());
        assert!(from_anthropic(Some(&json!({"type": "any"})), &[]).is_err());
    }

    #[test]
    fn required_with_one_tool_names_it() {
        let one = vec![tools().remove(0)];
        let c = ToolChoice {
            mode: Mode::Required,
            parallel: true,
        };
        assert_eq!(c.forced_name(&one), Some("get_weather"));
        assert_eq!(c.forced_name(&tools()), None);
        assert!(!ToolChoice::default().forces_call());
    }
}
