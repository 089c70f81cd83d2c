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

/// The text a forced tool call starts with is the start of what each real
/// template writes for an assistant call, it ends on a token boundary of
/// that rendering (the model continues in the tokens it was trained on),
/// and the parser, told about it, turns the template's own rest of the call
/// into exactly that call.
#[test]
fn forced_call_prefix_is_the_templates_own_call_start() {
    use crate::toolcall::{ToolCallParser, ToolForm};
    let tokenizer = crate::tokenizer::Tokenizer::from_model_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/models/tiny-qwen3-moe-coder"
    )))
    .expect("tokenizer of ../shared/models/tiny-qwen3-moe-coder");
    let conv = conversation();
    let messages = conv["messages"].as_array().expect("messages").clone();
    let tools = conv["tools"].as_array().expect("tools").clone();
    let schemas = ToolSchemas::from_openai_tools(&tools);
    for (tmpl, expected, form) in [
        (
            "qwen3-coder.jinja",
            "qwen3-coder.tools.expected.txt",
            ToolForm::Xml,
        ),
        ("qwen3.jinja", "qwen3.tools.expected.txt", ToolForm::Hermes),
    ] {
        let full = read(expected);
        // The conversation up to the user's question, with the generation
        // prompt: the turn in which the model made its call.
        let head = render(&template(tmpl), &messages[..2], tools.clone());
        assert_eq!(ToolForm::detect(&head), form, "{tmpl}");
        for name in [Some("get_weather"), None] {
            let prefix = form.forced_prefix(name);
            let prompt = format!("{head}{prefix}");
            assert!(
                full.starts_with(&prompt),
                "{tmpl} {name:?}: {prefix:?} is not how the template starts the call"
            );
            let ids_prompt = tokenizer.encode(&prompt, false).expect("encode");
            let ids_full = tokenizer.encode(&full, false).expect("encode");
            assert_eq!(
                &ids_full[..ids_prompt.len()],
                &ids_prompt[..],
                "{tmpl} {name:?}: {prefix:?} splits a token of the template's rendering"
            );
            let rest = &full[prompt.len()..];
            let rest = &rest[..rest.find("<|im_end|>").expect("end of turn")];
            let (mut parser, mut events) = ToolCallParser::with_prefix(schemas.clone(), &prefix);
            events.extend(parser.push(rest));
            events.extend(parser.finish());
            let (text, calls) = collect(&events);
            assert_eq!(text.trim(), "", "{tmpl} {name:?}");
            assert_eq!(calls.len(), 1, "{tmpl} {name:?}");
            assert_eq!(calls[0].name, "get_weather");
            let args: Value = serde_json::from_str(&calls[0].arguments).expect("arguments JSON");
            assert_eq!(args, json!({"city": "Zürich", "unit": "celsius"}), "{tmpl}");
        }
    }
}
