//! Grammars built from requests, run against the bundled tiny model's real
//! tokenizer: which replies they accept token by token, and that what they
//! accept parses back into the calls and JSON the request asked for.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::grammar::{self, CallSyntax, JsonShape, ToolCalls, ToolDef};
use super::{ConstrainError, GrammarEnv};
use crate::toolcall::{parse_all, ParserSpec, ToolEvent, ToolSchemas};

const EOS: u32 = 2;

fn tokenizer() -> tokenizers::Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/tiny-qwen3-moe-coder/tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn env() -> GrammarEnv {
    GrammarEnv::new(&tokenizer(), &[EOS], 8192).expect("token trie")
}

/// Whether `lark` (after `prefix`) accepts `text` as a whole reply: every
/// token allowed in turn, then end-of-sequence.
fn accepts_with(env: &GrammarEnv, lark: &str, prefix: &str, text: &str) -> bool {
    accepts_then(env, lark, prefix, text, EOS)
}

/// [`accepts_with`] for a tokenizer whose end-of-sequence token is `eos`.
fn accepts_then(env: &GrammarEnv, lark: &str, prefix: &str, text: &str, eos: u32) -> bool {
    let g = env
        .compile(lark, prefix)
        .unwrap_or_else(|e| panic!("{e}\n{lark}"));
    let mut m = g.mask();
    m.accepts(&env.tokenize(text)) && m.allows_eos(eos)
}

fn accepts(lark: &str, text: &str) -> bool {
    accepts_with(&env(), lark, "", text)
}

fn weather() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        },
        "required": ["city", "days"],
        "additionalProperties": false
    })
}

fn calls(syntax: CallSyntax, tools: &[(&'static str, &Value)], parallel: bool) -> String {
    calls_with(syntax, tools, parallel, &[])
}

/// [`calls`] for a tokenizer whose special tokens are `special`.
fn calls_with(
    syntax: CallSyntax,
    tools: &[(&'static str, &Value)],
    parallel: bool,
    special: &[String],
) -> String {
    grammar::tool_calls(&ToolCalls {
        syntax,
        tools: tools
            .iter()
            .map(|(name, parameters)| ToolDef {
                name,
                parameters,
                strict: true,
            })
            .collect(),
        parallel,
        reasoning: false,
        special,
    })
    .expect("grammar")
}

#[test]
fn json_object_is_one_object_in_dumps_style() {
    let g = grammar::json_reply(JsonShape::AnyObject, false);
    assert!(accepts(&g, r#"{"a": 1, "b": [true, null, "x"]}"#));
    assert!(accepts(&g, "{}"));
    assert!(!accepts(&g, "[1]"));
    assert!(!accepts(&g, r#"{"a":1}"#), "only json.dumps separators");
    assert!(!accepts(&g, r#"{"a": 1} and more"#));
    assert!(!accepts(&g, r#"{"a": 1"#), "unfinished");
}

#[test]
fn json_schema_is_enforced() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let g = grammar::json_reply(
        JsonShape::Schema {
            schema: &schema,
            strict: true,
        },
        false,
    );
    assert!(accepts(&g, r#"{"name": "Ann", "age": 30}"#));
    assert!(!accepts(&g, r#"{"name": "Ann"}"#), "age is required");
    assert!(!accepts(&g, r#"{"name": "Ann", "age": -1}"#));
    assert!(
        !accepts(&g, r#"{"name": "Annabel", "age": 3}"#),
        "maxLength"
    );
    assert!(!accepts(&g, r#"{"name": "Ann", "age": 3, "x": 1}"#));
}

#[test]
fn strict_refuses_what_it_cannot_enforce_and_lenient_ignores_it() {
    let schema = json!({"type": "object", "properties": {"c": {"type": "string", "format": "no-such-format"}}});
    let env = env();
    let strict = grammar::json_reply(
        JsonShape::Schema {
            schema: &schema,
            strict: true,
        },
        false,
    );
    match env.compile(&strict, "") {
        Err(ConstrainError::Grammar(m)) => assert!(m.contains("no-such-format"), "{m}"),
        other => panic!(
            "expected a grammar error, got {:?}",
            other.map(|g| g.source().to_owned())
        ),
    }
    let lenient = grammar::json_reply(
        JsonShape::Schema {
            schema: &schema,
            strict: false,
        },
        false,
    );
    assert!(accepts_with(&env, &lenient, "", r#"{"c": "anything"}"#));
}

#[test]
fn hermes_calls_name_an_offered_tool_with_schema_valid_arguments() {
    let w = weather();
    let empty = json!({"type": "object", "properties": {}});
    let one = calls(
        CallSyntax::Hermes,
        &[("get_weather", &w), ("now", &empty)],
        false,
    );
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>";
    let now = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
    assert!(accepts(&one, call));
    assert!(accepts(&one, now));
    assert!(!accepts(&one, &format!("{call}\n{now}")), "one call only");
    assert!(!accepts(&one, "Sure! I will call it."));
    assert!(!accepts(
        &one,
        "<tool_call>\n{\"name\": \"get_wether\", \"arguments\": {}}\n</tool_call>"
    ));
    assert!(!accepts(
        &one,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 9}}\n</tool_call>"
    ));
    assert!(!accepts(
        &one,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
    ));
    let many = calls(
        CallSyntax::Hermes,
        &[("get_weather", &w), ("now", &empty)],
        true,
    );
    assert!(accepts(&many, &format!("{call}\n{now}")));

    // What the grammar allows is what the Hermes parser reads back.
    let spec = ParserSpec {
        format: crate::toolcall::ChatFormat::Qwen(crate::toolcall::ToolForm::Hermes),
        tools: Some(ToolSchemas::from_openai_tools(&[])),
        think: false,
        in_reasoning: false,
    };
    assert_eq!(
        parsed_calls(&format!("{call}\n{now}"), spec),
        vec![
            ("get_weather".into(), json!({"city": "Paris", "days": 2})),
            ("now".into(), json!({})),
        ]
    );
}

#[test]
fn the_forced_opening_is_consumed_and_the_rest_constrained() {
    let w = weather();
    let g = calls(CallSyntax::Hermes, &[("get_weather", &w)], true);
    let env = env();
    let prefix = crate::toolcall::ToolForm::Hermes.forced_prefix(Some("get_weather"));
    assert!(accepts_with(
        &env,
        &g,
        &prefix,
        " {\"city\": \"Rome\", \"days\": 1}}\n</tool_call>"
    ));
    assert!(!accepts_with(&env, &g, &prefix, " {}}\n</tool_call>"));
    // An opening the grammar cannot continue is the server's bug: a Parser error.
    assert!(matches!(
        env.compile(&g, "<tool_call>\n{\"name\": \"other\""),
        Err(ConstrainError::Parser(_))
    ));
    let x = calls(CallSyntax::QwenXml, &[("get_weather", &w)], false);
    let prefix = crate::toolcall::ToolForm::Xml.forced_prefix(None);
    assert!(accepts_with(
        &env,
        &x,
        &prefix,
        "=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>"
    ));
}

#[test]
fn qwen_xml_calls_follow_the_schema_and_parse_back() {
    let w = weather();
    let g = calls(CallSyntax::QwenXml, &[("get_weather", &w)], true);
    let call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis, \"France\"\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>";
    assert!(accepts(&g, call));
    let no_unit = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
    assert!(accepts(&g, no_unit), "unit is optional");
    assert!(accepts(&g, &format!("{call}\n{no_unit}")));
    for bad in [
        // days missing (required)
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        // days not an integer
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\ntwo\n</parameter>\n</function>\n</tool_call>",
        // unit outside its enum
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=unit>\nkelvin\n</parameter>\n</function>\n</tool_call>",
        // a value that would end the parameter early
        "<tool_call>\n<function=get_weather>\n<parameter=city>\na</parameter>b\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        // values the streaming parser would split into more parameters
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n<parameter=city>\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nx\n</function>\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    ] {
        assert!(!accepts(&g, bad), "{bad}");
    }
    let spec = weather_spec(
        crate::toolcall::ChatFormat::Qwen(crate::toolcall::ToolForm::Xml),
        &w,
    );
    assert_eq!(
        parsed_calls(call, spec.clone()),
        vec![(
            "get_weather".into(),
            json!({"city": "Paris, \"France\"", "days": 2, "unit": "celsius"})
        )]
    );
    // A tag-like string inside a line is text, and parses back as such.
    let inline = "<tool_call>\n<function=get_weather>\n<parameter=city>\na <parameter=b> c\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";
    assert!(accepts(&g, inline));
    assert_eq!(
        parsed_calls(inline, spec),
        vec![(
            "get_weather".into(),
            json!({"city": "a <parameter=b> c", "days": 2})
        )]
    );
}

/// Numbers without bounds have a bounded length: a weak model given an
/// optional integer must not be able to write digits until the context is
/// full (the Codex `exec_command` case, issue 23).
#[test]
fn unbounded_numbers_have_a_bounded_length() {
    let exec = json!({
        "type": "object",
        "properties": {
            "cmd": {"type": "string"},
            "max_output_tokens": {"type": "integer", "description": "Output token budget."},
            "yield_time_ms": {"type": "number", "description": "Wait before yielding output."}
        },
        "required": ["cmd"]
    });
    let xml = calls(CallSyntax::QwenXml, &[("exec_command", &exec)], false);
    let xml_call = |n: &str, t: &str| {
        format!("<tool_call>\n<function=exec_command>\n<parameter=cmd>\nls\n</parameter>\n<parameter=max_output_tokens>\n{n}\n</parameter>\n<parameter=yield_time_ms>\n{t}\n</parameter>\n</function>\n</tool_call>")
    };
    let d15 = "123456789012345";
    let d16 = "1234567890123456";
    for (n, t) in [
        ("10000", "250"),
        (d15, "1.5"),
        ("-3", "-0.25e3"),
        ("0", d15),
    ] {
        assert!(accepts(&xml, &xml_call(n, t)), "{n} {t}");
    }
    let long_fraction = format!("1.{d16}");
    for (n, t) in [
        (d16, "1"),
        ("1", d16),
        ("1", long_fraction.as_str()),
        ("007", "1"),
        ("1.5", "1"),
    ] {
        assert!(!accepts(&xml, &xml_call(n, t)), "{n} {t}");
    }
    // Inside JSON (Hermes, and non-plain XML values): integers without
    // bounds get 15 digits; a schema's own bounds still decide.
    let hermes = calls(CallSyntax::Hermes, &[("exec_command", &exec)], false);
    let hermes_call = |n: &str| {
        format!("<tool_call>\n{{\"name\": \"exec_command\", \"arguments\": {{\"cmd\": \"ls\", \"max_output_tokens\": {n}}}}}\n</tool_call>")
    };
    assert!(accepts(&hermes, &hermes_call(d15)));
    assert!(accepts(&hermes, &hermes_call(&format!("-{d15}"))));
    assert!(!accepts(&hermes, &hermes_call(d16)));
    let big = json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 1e18}}, "required": ["n"]});
    let g = calls(CallSyntax::Hermes, &[("f", &big)], false);
    let f = |n: &str| {
        format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"n\": {n}}}}}\n</tool_call>")
    };
    assert!(
        accepts(&g, &f("100000000000000000")),
        "the schema's own maximum wins"
    );
}

#[test]
fn xml_refuses_what_raw_text_cannot_carry() {
    let ints = json!({"type": "object", "properties": {"n": {"enum": [1, 2]}}});
    let e = grammar::tool_calls(&ToolCalls {
        syntax: CallSyntax::QwenXml,
        tools: vec![ToolDef {
            name: "pick",
            parameters: &ints,
            strict: false,
        }],
        parallel: false,
        reasoning: false,
        special: &[],
    })
    .expect_err("refused");
    assert!(e.to_string().contains("`n`"), "{e}");
}

#[test]
fn an_open_reasoning_block_closes_before_the_constrained_part() {
    let g = grammar::json_reply(JsonShape::AnyObject, true);
    assert!(accepts(&g, "Let me see.\n</think>\n\n{\"a\": 1}"));
    assert!(accepts(&g, "</think>{\"a\": 1}"));
    assert!(!accepts(&g, "{\"a\": 1}"), "still inside <think>");
    assert!(!accepts(&g, "Let me see.\n</think>\n\nplain text"));
}

/// An added token the tokenizer does not call special (Qwen's
/// `<tool_call>`) is text to the grammar: the single token the model
/// writes matches the literal "<tool_call>" (as a special token it could
/// only be named as `<tool_call>` in Lark, and the literal would ban it).
#[test]
fn non_special_added_tokens_are_text() {
    let mut t = tokenizer();
    t.add_tokens(&[tokenizers::AddedToken::from("<tool_call>", false)]);
    let id = t.token_to_id("<tool_call>").expect("added");
    let env = GrammarEnv::new(&t, &[EOS], 8192 + 1).expect("trie");
    let empty = json!({"type": "object", "properties": {}});
    let g = env
        .compile(&calls(CallSyntax::Hermes, &[("now", &empty)], false), "")
        .expect("compiles");
    let rest = env.tokenize("\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>");
    let mut m = g.mask();
    assert!(m.accepts(&[id]) && m.accepts(&rest) && m.allows_eos(EOS));
    assert_eq!(env.tokenize("<tool_call>")[..], [id]);
}

/// How the server parses a reply in `format` when `get_weather` (arguments
/// `w`) was offered.
fn weather_spec(format: crate::toolcall::ChatFormat, w: &Value) -> ParserSpec {
    ParserSpec {
        format,
        tools: Some(ToolSchemas::from_openai_tools(&[json!({
            "type": "function",
            "function": {"name": "get_weather", "parameters": w}
        })])),
        think: false,
        in_reasoning: false,
    }
}

fn parsed_calls(text: &str, spec: ParserSpec) -> Vec<(String, Value)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in parse_all(text, spec) {
        match e {
            ToolEvent::CallStart { name, .. } => out.push((name, String::new())),
            ToolEvent::ArgsDelta { json, .. } => {
                if let Some(last) = out.last_mut() {
                    last.1.push_str(&json);
                }
            }
            ToolEvent::Text(t) => assert!(t.trim().is_empty(), "text {t:?}"),
            _ => {}
        }
    }
    out.into_iter()
        .map(|(n, a)| (n, serde_json::from_str(&a).expect("arguments are JSON")))
        .collect()
}

/// The tiny model's tokenizer with gpt-oss's harmony markers added as
/// special tokens (gpt-oss's own tokenizer is not in the test material), and
/// `<|call|>`/`<|return|>` as the end-of-sequence tokens, as gpt-oss's
/// generation config has them.
fn harmony_env() -> (GrammarEnv, u32) {
    let mut tok = tokenizer();
    let marks = [
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|constrain|>",
        "<|call|>",
        "<|return|>",
    ];
    tok.add_special_tokens(&marks.map(|m| tokenizers::AddedToken::from(m, true)));
    let id = |m: &str| tok.token_to_id(m).expect("added marker");
    let (call, ret) = (id("<|call|>"), id("<|return|>"));
    let vocab = tok.get_vocab_size(true);
    (
        GrammarEnv::new(&tok, &[call, ret], vocab).expect("token trie"),
        call,
    )
}

#[test]
fn harmony_calls_follow_the_schema_and_parse_back() {
    let (env, call) = harmony_env();
    let w = weather();
    let empty = json!({"type": "object", "properties": {}});
    let g = calls(
        CallSyntax::Harmony,
        &[("get_weather", &w), ("ping", &empty)],
        true,
    );
    let ok = |prefix: &str, text: &str| accepts_then(&env, &g, prefix, text, call);
    let args = r#"{"city": "Rome", "days": 2}"#;
    let whole = format!(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{args}"
    );
    assert!(ok("", &whole), "{g}");
    assert!(ok(
        "",
        "<|channel|>commentary to=functions.ping <|constrain|>json<|message|>{}"
    ));
    // What the server forces for `required`, then for a named tool.
    let any = crate::toolcall::ChatFormat::Harmony.forced_prefix(None, false);
    assert!(ok(
        &any,
        &format!("get_weather <|constrain|>json<|message|>{args}")
    ));
    let named = crate::toolcall::ChatFormat::Harmony.forced_prefix(Some("get_weather"), false);
    assert!(ok(&named, args));
    for bad in [
        // no such tool
        format!("<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{args}"),
        // days missing (required), then out of range
        r#"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Rome"}"#.to_owned(),
        r#"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Rome", "days": 9}"#.to_owned(),
        // a final answer instead of the call
        "<|channel|>final<|message|>It is sunny.".to_owned(),
        // text after the arguments
        format!("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{args} and more"),
    ] {
        assert!(!ok("", &bad), "{bad}");
    }
    let spec = weather_spec(crate::toolcall::ChatFormat::Harmony, &w);
    // The model's `<|call|>` ends the reply; the parser sees it too.
    assert_eq!(
        parsed_calls(&format!("{whole}<|call|>"), spec),
        vec![("get_weather".into(), json!({"city": "Rome", "days": 2}))]
    );
}

/// DeepSeek-V3.1's markers; its tokenizer has them as special tokens.
const DS_MARKS: [&str; 5] = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
];

/// The tiny tokenizer with its end of sentence added (special) and
/// DeepSeek's call markers added as special tokens (as DeepSeek's tokenizer
/// has them), or not added at all: then they are text, several byte-level
/// tokens each.
fn deepseek_env(special: bool) -> (GrammarEnv, u32) {
    let mut tok = tokenizer();
    let eos = "<｜end▁of▁sentence｜>";
    if special {
        let marks: Vec<tokenizers::AddedToken> = DS_MARKS
            .iter()
            .map(|m| tokenizers::AddedToken::from(*m, true))
            .collect();
        tok.add_special_tokens(&marks);
    }
    tok.add_special_tokens(&[tokenizers::AddedToken::from(eos, true)]);
    let end = tok.token_to_id(eos).expect("added end");
    let vocab = tok.get_vocab_size(true);
    (
        GrammarEnv::new(&tok, &[end], vocab).expect("token trie"),
        end,
    )
}

#[test]
fn deepseek_calls_follow_the_schema_and_parse_back_with_special_or_text_markers() {
    let w = weather();
    let empty = json!({"type": "object", "properties": {}});
    let args = r#"{"city": "Rome", "days": 2}"#;
    let call = |name: &str, a: &str| {
        format!("<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{a}<｜tool▁call▁end｜>")
    };
    let whole = format!(
        "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>",
        call("get_weather", args)
    );
    for special in [true, false] {
        let (env, end) = deepseek_env(special);
        let marks: Vec<String> = if special {
            DS_MARKS.iter().map(|m| m.to_string()).collect()
        } else {
            Vec::new()
        };
        let tools = [("get_weather", &w), ("ping", &empty)];
        let g = calls_with(CallSyntax::DeepSeek, &tools, true, &marks);
        assert_eq!(g.contains("\"<｜tool▁sep｜>\""), !special, "{g}");
        let ok = |prefix: &str, text: &str| accepts_then(&env, &g, prefix, text, end);
        assert!(ok("", &whole), "special {special}: {g}");
        let two = format!(
            "<｜tool▁calls▁begin｜>{}{}<｜tool▁calls▁end｜>",
            call("get_weather", args),
            call("ping", "{}")
        );
        assert!(ok("", &two), "special {special}");
        // What the server forces for `required`, then for a named tool.
        let fmt = crate::toolcall::ChatFormat::DeepSeek;
        let any = fmt.forced_prefix(None, false);
        assert!(ok(
            &any,
            "ping<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        ));
        let named = fmt.forced_prefix(Some("get_weather"), false);
        assert!(ok(
            &named,
            &format!("{args}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
        ));
        for bad in [
            // no such tool
            format!(
                "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>",
                call("get_time", args)
            ),
            // days missing (required)
            format!(
                "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>",
                call("get_weather", r#"{"city": "Rome"}"#)
            ),
            // text instead of a call, and text after the calls
            "It is sunny.".to_owned(),
            format!("{whole} and more"),
        ] {
            assert!(!ok("", &bad), "special {special}: {bad}");
        }
        // Without parallel calls a second call is refused.
        let one = calls_with(CallSyntax::DeepSeek, &tools, false, &marks);
        assert!(
            !accepts_then(&env, &one, "", &two, end),
            "special {special}"
        );
        if special {
            // Why markers must be named as tokens: as text they cannot
            // match the special tokens the model emits.
            let text = calls_with(CallSyntax::DeepSeek, &tools, true, &[]);
            assert!(!accepts_then(&env, &text, "", &whole, end));
        }
    }
    let spec = weather_spec(crate::toolcall::ChatFormat::DeepSeek, &w);
    assert_eq!(
        parsed_calls(&whole, spec),
        vec![("get_weather".into(), json!({"city": "Rome", "days": 2}))]
    );
}
