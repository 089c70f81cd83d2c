//! The server's request translation against the real Qwen3 and Qwen3-Coder
//! chat templates: an OpenAI request and the equivalent Anthropic request
//! must render exactly what transformers' `apply_chat_template` rendered for
//! the same conversation (`tests/data/templates/*.expected.txt`, made by
//! `render_reference.py`), and what the templates write for an assistant
//! tool call must parse back into that call.

use serde_json::{json, Value};

use super::{anthropic, openai};
use crate::chat::{ChatTemplate, RenderOptions};
use crate::toolcall::{collect, parse_complete, ToolCall, ToolSchemas};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/templates/");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("{DIR}{name}: {e}"))
}

fn template(name: &str) -> ChatTemplate {
    ChatTemplate::new(read(name), name.into(), None, Some("<|im_end|>".into()))
        .expect("template compiles")
}

fn conversation() -> Value {
    serde_json::from_str(&read("conversation.json")).expect("conversation.json")
}

/// The conversation as an OpenAI client sends it: arguments as a JSON string.
fn openai_request() -> Value {
    let mut conv = conversation();
    for m in conv["messages"].as_array_mut().expect("messages") {
        if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
            for c in calls {
                let args = c["function"]["arguments"].to_string();
                c["function"]["arguments"] = Value::String(args);
            }
        }
    }
    conv
}

/// The same conversation as an Anthropic client sends it.
fn anthropic_request() -> Value {
    let conv = conversation();
    let f = &conv["tools"][0]["function"];
    json!({
        "max_tokens": 100,
        "system": "You are a terse assistant.",
        "tools": [{"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}],
        "messages": [
            {"role": "user", "content": "What's the weather in Zürich?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                "input": {"city": "Zürich", "unit": "celsius"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                "content": [{"type": "text", "text": "{\"temp\": 21, \"sky\": \"clear\"}"}]}]},
            {"role": "user", "content": "  And should I take an umbrella?  "},
        ],
    })
}

fn render(t: &ChatTemplate, messages: &[Value], tools: Vec<Value>) -> String {
    let opts = RenderOptions {
        tools: Some(tools),
        add_generation_prompt: true,
        extra: Default::default(),
    };
    t.render(messages, &opts).expect("renders")
}

fn openai_messages() -> (Vec<Value>, Vec<Value>) {
    let req: openai::ChatRequest = serde_json::from_value(openai_request()).expect("request");
    let tools = req.tools.clone().unwrap_or_default();
    (
        openai::to_template_messages(req.messages).expect("messages"),
        tools,
    )
}

fn anthropic_messages() -> (Vec<Value>, Vec<Value>) {
    let req: anthropic::MessagesRequest =
        serde_json::from_value(anthropic_request()).expect("request");
    let tools = anthropic::to_openai_tools(req.tools.unwrap_or_default());
    (
        anthropic::to_template_messages(req.system, req.messages).expect("messages"),
        tools,
    )
}

#[test]
fn openai_request_renders_like_transformers() {
    for (tmpl, expected) in [
        ("qwen3-coder.jinja", "qwen3-coder.tools.expected.txt"),
        ("qwen3.jinja", "qwen3.tools.expected.txt"),
    ] {
        let (messages, tools) = openai_messages();
        assert_eq!(
            render(&template(tmpl), &messages, tools),
            read(expected),
            "{tmpl}"
        );
    }
}

#[test]
fn anthropic_request_renders_like_transformers() {
    for (tmpl, expected) in [
        ("qwen3-coder.jinja", "qwen3-coder.tools.expected.txt"),
        ("qwen3.jinja", "qwen3.tools.expected.txt"),
    ] {
        let (messages, tools) = anthropic_messages();
        assert_eq!(
            render(&template(tmpl), &messages, tools),
            read(expected),
            "{tmpl}"
        );
    }
}

/// The text between the last assistant header and `<|im_end|>` in a
/// rendered conversation: what the model was shown as its own tool call.
fn rendered_call(expected: &str) -> String {
    let start = expected
        .find("<|im_start|>assistant\n<tool_call>")
        .expect("assistant call")
        + "<|im_start|>assistant\n".len();
    let len = expected[start..].find("<|im_end|>").expect("end");
    expected[start..start + len].to_owned()
}

#[test]
fn templates_own_tool_call_form_parses_back() {
    let conv = conversation();
    let schemas = ToolSchemas::from_openai_tools(conv["tools"].as_array().expect("tools"));
    for expected in ["qwen3-coder.tools.expected.txt", "qwen3.tools.expected.txt"] {
        let text = rendered_call(&read(expected));
        let (rest, calls) = collect(&parse_complete(&text, schemas.clone()));
        assert_eq!(rest, "", "{expected}");
        assert_eq!(calls.len(), 1, "{expected}");
        let ToolCall { name, arguments } = &calls[0];
        assert_eq!(name, "get_weather");
        let args: Value = serde_json::from_str(arguments).expect("arguments JSON");
        assert_eq!(
            args,
            json!({"city": "Zürich", "unit": "celsius"}),
            "{expected}"
        );
    }
}
