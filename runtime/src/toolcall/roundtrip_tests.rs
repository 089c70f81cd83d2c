//! Round trips through the real chat templates of each family
//! (`tests/data/templates/`, see its README): a conversation with
//! reasoning, tool calls and tool results is rendered by the model's own
//! template; the assistant turn, as the template writes it, is what the
//! model was trained to generate; fed to the output parser (whole, and in
//! 1-3 character deltas) it must give back the reasoning, text and calls
//! the conversation held.

use serde_json::{json, Value};

use super::{collect_all, merge_text, ChatFormat, OutputParser, ParserSpec, ToolForm, ToolSchemas};
use crate::chat::{adapt_reasoning_field, ChatTemplate, RenderOptions};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/templates/");

struct Case {
    file: &'static str,
    format: ChatFormat,
    /// Template variables (e.g. DeepSeek's `thinking`).
    extra: Value,
    /// End-of-turn text the template writes after the turn; the model
    /// generates it as an end-of-sequence token, which is not output.
    eos: &'static [&'static str],
    /// The template writes the reasoning of the turn into the history.
    renders_reasoning: bool,
    /// The template writes more than one call per turn.
    parallel: bool,
    /// The template writes text beside a call.
    text_with_calls: bool,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "qwen3.jinja",
            format: ChatFormat::Qwen(ToolForm::Hermes),
            extra: json!({}),
            eos: &["<|im_end|>"],
            renders_reasoning: true,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "qwen3-coder.jinja",
            format: ChatFormat::Qwen(ToolForm::Xml),
            extra: json!({}),
            eos: &["<|im_end|>"],
            renders_reasoning: false,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "gpt-oss.jinja",
            format: ChatFormat::Harmony,
            extra: json!({}),
            eos: &["<|call|>", "<|return|>"],
            renders_reasoning: true,
            // One call per message, and a call's text is its analysis.
            parallel: false,
            text_with_calls: false,
        },
        Case {
            file: "minimax-m2.jinja",
            format: ChatFormat::MiniMax,
            extra: json!({}),
            eos: &["[e~["],
            renders_reasoning: true,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "glm-4.6.jinja",
            format: ChatFormat::Glm,
            extra: json!({}),
            eos: &[],
            renders_reasoning: true,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "glm-4.7-flash.jinja",
            format: ChatFormat::Glm,
            extra: json!({}),
            eos: &[],
            renders_reasoning: true,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "deepseek-v3.1.jinja",
            format: ChatFormat::DeepSeek,
            // Thinking mode: the generation prompt opens `<think>`.
            extra: json!({"thinking": true}),
            eos: &["<｜end▁of▁sentence｜>"],
            // V3.1 drops reasoning from the history.
            renders_reasoning: false,
            parallel: true,
            text_with_calls: true,
        },
        Case {
            file: "deepseek-v3.2.jinja",
            format: ChatFormat::Dsml,
            extra: json!({"thinking": true}),
            eos: &["<｜end▁of▁sentence｜>"],
            renders_reasoning: true,
            parallel: true,
            text_with_calls: true,
        },
    ]
}

fn template(file: &str) -> ChatTemplate {
    let src = std::fs::read_to_string(format!("{DIR}{file}")).expect("template file");
    ChatTemplate::new(src, file.into(), Some("<bos>".into()), None).expect("template compiles")
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"},
                "note": {"type": "string"},
                "days": {"type": "integer"},
                "opts": {"type": "object"}
            }, "required": ["city"]}}}),
        json!({"type": "function", "function": {
            "name": "now",
            "description": "The time.",
            "parameters": {"type": "object", "properties": {}}}}),
    ]
}

fn call(name: &str, args: Value) -> Value {
    json!({"id": format!("call_{name}"), "type": "function",
           "function": {"name": name, "arguments": args}})
}

/// What one assistant turn holds.
struct Turn {
    reasoning: &'static str,
    text: &'static str,
    calls: Vec<(&'static str, Value)>,
}

fn turn_message(t: &Turn) -> Value {
    let mut m = json!({"role": "assistant", "content": t.text});
    if !t.reasoning.is_empty() {
        m["reasoning_content"] = json!(t.reasoning);
    }
    if !t.calls.is_empty() {
        m["tool_calls"] = Value::Array(t.calls.iter().map(|(n, a)| call(n, a.clone())).collect());
    }
    m
}

/// The turn as the template writes it after the conversation `before`,
/// with what the parser must be told about the prompt.
fn rendered_turn(case: &Case, t: &ChatTemplate, before: &[Value], turn: &Turn) -> (String, String) {
    let extra = case.extra.as_object().expect("extra").clone();
    let opts = |gen: bool| RenderOptions {
        tools: Some(tools()),
        add_generation_prompt: gen,
        extra: extra.clone(),
    };
    let mut head = before.to_vec();
    adapt_reasoning_field(&mut head, t.source());
    let prompt = t.render(&head, &opts(true)).expect("prompt renders");
    let mut all = before.to_vec();
    all.push(turn_message(turn));
    adapt_reasoning_field(&mut all, t.source());
    let full = t.render(&all, &opts(false)).expect("conversation renders");
    assert!(
        full.starts_with(&prompt),
        "{}: the rendered turn does not continue the generation prompt\nprompt: {prompt:?}\nfull: {full:?}",
        case.file
    );
    let mut out = full[prompt.len()..].trim_end().to_owned();
    for eos in case.eos {
        if let Some(s) = out.strip_suffix(eos) {
            out = s.to_owned();
            break;
        }
    }
    (prompt, out)
}

/// Parses `text` fed in pieces of the given character lengths (cycled).
fn parse(spec: &ParserSpec, text: &str, sizes: &[usize]) -> super::Parsed {
    let mut p = OutputParser::new(spec.clone());
    let chars: Vec<char> = text.chars().collect();
    let mut events = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < chars.len() {
        let n = sizes[i % sizes.len()].min(chars.len() - at);
        events.extend(p.push(&chars[at..at + n].iter().collect::<String>()));
        at += n;
        i += 1;
    }
    events.extend(p.finish());
    collect_all(&merge_text(events))
}

fn check(case: &Case, what: &str, spec: &ParserSpec, text: &str, want: &Turn) {
    for sizes in [
        &[usize::MAX][..],
        &[1],
        &[2],
        &[3],
        &[1, 3, 2],
        &[2, 1, 1, 3],
    ] {
        let got = parse(spec, text, sizes);
        let ctx = format!("{} {what}, deltas {sizes:?}, output {text:?}", case.file);
        let reasoning = if case.renders_reasoning {
            want.reasoning
        } else {
            ""
        };
        assert_eq!(got.reasoning, reasoning, "reasoning: {ctx}");
        assert_eq!(got.text, want.text, "text: {ctx}");
        assert_eq!(got.calls.len(), want.calls.len(), "calls: {ctx}");
        for (c, (name, args)) in got.calls.iter().zip(&want.calls) {
            assert_eq!(c.name, *name, "{ctx}");
            let parsed: Value = serde_json::from_str(&c.arguments)
                .unwrap_or_else(|e| panic!("arguments {:?} not JSON ({e}): {ctx}", c.arguments));
            assert_eq!(&parsed, args, "{ctx}");
        }
    }
}

#[test]
fn every_family_round_trips_reasoning_text_and_calls() {
    let weather = json!({"city": "Zürich", "note": "line one\nsays \"hi\" & <b>bye</b>",
                         "days": 3, "opts": {"units": "metric", "hourly": [1, 2], "alerts": true}});
    for case in cases() {
        let t = template(case.file);
        let schemas = ToolSchemas::from_openai_tools(&tools());
        let system = json!({"role": "system", "content": "You are terse."});
        let user = json!({"role": "user", "content": "Weather in Zürich, and the time?"});

        // Turn 1: reasoning, text, and calls.
        let mut calls = vec![("get_weather", weather.clone())];
        if case.parallel {
            calls.push(("now", json!({})));
        }
        let turn1 = Turn {
            reasoning: "Two things: weather (3 days?) and time.\nIs 1 < 2? Yes.",
            text: if case.text_with_calls {
                "Checking both."
            } else {
                ""
            },
            calls,
        };
        let before = vec![system.clone(), user.clone()];
        let (prompt, out) = rendered_turn(&case, &t, &before, &turn1);
        let spec = ParserSpec::new(Some(t.source()), &prompt, Some(schemas.clone()));
        assert_eq!(spec.format, case.format, "{}: detected format", case.file);
        check(&case, "call turn", &spec, &out, &turn1);

        // Turn 2: after the tool results, reasoning and the answer.
        let bare = Turn {
            reasoning: "",
            text: "",
            calls: turn1.calls.clone(),
        };
        let mut before = before;
        before.push(turn_message(&bare));
        for (name, _) in &bare.calls {
            before.push(
                json!({"role": "tool", "tool_call_id": format!("call_{name}"),
                               "name": name, "content": "{\"temp\": 21}"}),
            );
        }
        let turn2 = Turn {
            reasoning: "21 degrees; say so.",
            text: "Sunny in Zürich: <b>21°C</b> & dry.\n\nAnything else?",
            calls: vec![],
        };
        let (prompt, out) = rendered_turn(&case, &t, &before, &turn2);
        let spec = ParserSpec::new(Some(t.source()), &prompt, Some(schemas.clone()));
        check(&case, "answer turn", &spec, &out, &turn2);

        // Without tools in the request, call markup would be text, but the
        // reasoning is still split off.
        let spec = ParserSpec::new(Some(t.source()), &prompt, None);
        check(&case, "answer turn, no tools", &spec, &out, &turn2);
    }
}

/// The forced start of a call is how the template starts a call, and the
/// template's rest of the call parses, after it, into that call.
#[test]
fn forced_prefixes_continue_into_the_templates_calls() {
    let args = json!({"city": "Oslo", "days": 2});
    for case in cases() {
        if case.format == ChatFormat::Harmony {
            continue; // harmony_forced_call_parses below
        }
        let t = template(case.file);
        let turn = Turn {
            reasoning: "",
            text: "",
            calls: vec![("get_weather", args.clone())],
        };
        let messages = [
            json!({"role": "user", "content": "Oslo?"}),
            turn_message(&turn),
        ];
        let opts = RenderOptions {
            tools: Some(tools()),
            add_generation_prompt: false,
            extra: case.extra.as_object().expect("extra").clone(),
        };
        // The whole conversation: templates that open `<think>` in the
        // generation prompt write no block for a turn without reasoning.
        let full = t.render(&messages, &opts).expect("renders");
        let mut out = full.trim_end();
        for eos in case.eos {
            out = out.strip_suffix(eos).unwrap_or(out);
        }
        let mut spec = ParserSpec::new(
            Some(t.source()),
            &full,
            Some(ToolSchemas::from_openai_tools(&tools())),
        );
        spec.in_reasoning = false;
        for name in [Some("get_weather"), None] {
            let prefix = case.format.forced_prefix(name, false);
            let prefix = prefix.trim_start();
            // The last one: the tool instructions may show the form too.
            let at = out
                .rfind(prefix)
                .unwrap_or_else(|| panic!("{}: {prefix:?} not in {out:?}", case.file));
            let (mut p, mut events) = OutputParser::with_prefix(spec.clone(), prefix);
            events.extend(p.push(&out[at + prefix.len()..]));
            events.extend(p.finish());
            let got = collect_all(&merge_text(events));
            assert_eq!(got.calls.len(), 1, "{} {name:?}: {got:?}", case.file);
            assert_eq!(got.calls[0].name, "get_weather");
            let parsed: Value = serde_json::from_str(&got.calls[0].arguments).expect("json");
            assert_eq!(parsed, args, "{}", case.file);
        }
    }
}

#[test]
fn harmony_forced_call_parses() {
    let spec = ParserSpec {
        format: ChatFormat::Harmony,
        tools: Some(ToolSchemas::from_openai_tools(&tools())),
        think: false,
        in_reasoning: false,
    };
    for (name, rest) in [
        (Some("now"), "{}"),
        (None, "now <|constrain|>json<|message|>{}"),
    ] {
        let prefix = ChatFormat::Harmony.forced_prefix(name, false);
        let (mut p, mut events) = OutputParser::with_prefix(spec.clone(), &prefix);
        events.extend(p.push(rest));
        events.extend(p.finish());
        let got = collect_all(&events);
        assert_eq!(got.calls.len(), 1, "{name:?}");
        assert_eq!(
            (got.calls[0].name.as_str(), got.calls[0].arguments.as_str()),
            ("now", "{}")
        );
    }
}

/// A prompt that opens `<think>` (MiniMax-M2 always, GLM-4.7 and DeepSeek
/// in thinking mode) puts the parser in reasoning, and the forced call
/// closes the block first.
#[test]
fn open_think_in_prompt_and_forced_call_close_it() {
    for (file, format) in [
        ("minimax-m2.jinja", ChatFormat::MiniMax),
        ("glm-4.7-flash.jinja", ChatFormat::Glm),
    ] {
        let t = template(file);
        let prompt = t
            .render(
                &[json!({"role": "user", "content": "hi"})],
                &RenderOptions {
                    tools: Some(tools()),
                    add_generation_prompt: true,
                    extra: Default::default(),
                },
            )
            .expect("renders");
        let spec = ParserSpec::new(
            Some(t.source()),
            &prompt,
            Some(ToolSchemas::from_openai_tools(&tools())),
        );
        assert_eq!(spec.format, format);
        assert!(spec.in_reasoning, "{file}: {prompt:?}");
        let prefix = format.forced_prefix(Some("now"), true);
        assert!(prefix.starts_with("</think>"), "{file}");
        let (mut p, mut events) = OutputParser::with_prefix(spec, &prefix);
        let close = match format {
            ChatFormat::MiniMax => "</invoke>\n</minimax:tool_call>",
            _ => "</tool_call>",
        };
        events.extend(p.push(close));
        events.extend(p.finish());
        let got = collect_all(&events);
        assert_eq!(
            (got.reasoning.as_str(), got.text.as_str()),
            ("", ""),
            "{file}"
        );
        assert_eq!(got.calls.len(), 1, "{file}: {got:?}");
        assert_eq!(
            (got.calls[0].name.as_str(), got.calls[0].arguments.as_str()),
            ("now", "{}")
        );
    }
}

/// Text with no reasoning or calls around it is the model's own, edges
/// included (greedy output must equal the reference's); only whitespace
/// next to markup is layout.
#[test]
fn plain_text_keeps_its_whitespace() {
    let plain = ParserSpec {
        format: ChatFormat::Qwen(ToolForm::Hermes),
        tools: Some(ToolSchemas::default()),
        think: true,
        in_reasoning: false,
    };
    for sizes in [&[usize::MAX][..], &[1], &[2, 3]] {
        let got = parse(&plain, "\n  def f():\n    pass\n\n", sizes);
        assert_eq!(got.text, "\n  def f():\n    pass\n\n", "{sizes:?}");
        let got = parse(&plain, "<think>\nr\n</think>\n\nAnswer:\n  x\n", sizes);
        assert_eq!(
            (got.reasoning.as_str(), got.text.as_str()),
            ("r", "Answer:\n  x\n")
        );
        // An empty block the prompt opened still makes what follows a new segment.
        let opened = ParserSpec {
            in_reasoning: true,
            ..plain.clone()
        };
        let got = parse(&opened, "</think>\n\nHi", sizes);
        assert_eq!((got.reasoning.as_str(), got.text.as_str()), ("", "Hi"));
    }
}
