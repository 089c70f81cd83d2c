//! What constrained decoding costs per token: the time llguidance takes to
//! compute each step's token mask, beside the time a decoded token takes.
//! Not a pass/fail test (no timed asserts): run it by hand and copy the
//! numbers into docs/PERF.md.
//!
//! ```text
//! cargo test --release -p mfx-runtime --test grammar_cost -- --ignored --nocapture
//! MFX_GRAMMAR_MODEL=/path/model.mfx cargo test --release … (another model)
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use mfx_runtime::constrain::grammar::{self, CallSyntax, JsonShape, ToolCalls, ToolDef};
use mfx_runtime::constrain::GrammarEnv;
use mfx_runtime::generate::{GenerateOptions, Generator, TokenConstraint};
use mfx_runtime::models::LoadOptions;
use mfx_runtime::sampling::SamplingParams;
use serde_json::json;

#[test]
#[ignore = "a measurement, run by hand (see the module docs)"]
fn mask_cost_per_token() {
    let model = std::env::var("MFX_GRAMMAR_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/models/tiny-qwen3-moe-coder")
        });
    let mut gen = Generator::load(&model, &LoadOptions::default()).expect("load model");
    let t = Instant::now();
    let env = GrammarEnv::new(
        gen.tokenizer().inner(),
        gen.eos_ids(),
        gen.model_info().vocab_size,
    )
    .expect("token trie");
    println!(
        "{}: vocab {}, token trie built in {:.1} ms",
        model.display(),
        gen.model_info().vocab_size,
        t.elapsed().as_secs_f64() * 1e3
    );
    let person = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 60},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 8}},
        "required": ["name", "age", "email", "languages"], "additionalProperties": false});
    let edit = json!({"type": "object", "properties": {
        "path": {"type": "string", "maxLength": 80},
        "old": {"type": "string", "maxLength": 200},
        "new": {"type": "string", "maxLength": 200},
        "count": {"type": "integer", "minimum": 1, "maximum": 100}},
        "required": ["path", "old", "new"], "additionalProperties": false});
    let tools = |syntax| {
        grammar::tool_calls(&ToolCalls {
            syntax,
            tools: vec![ToolDef {
                name: "edit_file",
                parameters: &edit,
                strict: true,
            }],
            parallel: false,
            reasoning: false,
            special: &[],
        })
        .expect("grammar")
    };
    let cases = [
        (
            "json_object",
            grammar::json_reply(JsonShape::AnyObject, false),
        ),
        (
            "json_schema",
            grammar::json_reply(
                JsonShape::Schema {
                    schema: &person,
                    strict: true,
                },
                false,
            ),
        ),
        ("hermes call", tools(CallSyntax::Hermes)),
        ("xml call", tools(CallSyntax::QwenXml)),
    ];
    let prompt = gen
        .encode_prompt("<|im_start|>user\nWrite some JSON.<|im_end|>\n<|im_start|>assistant\n")
        .expect("prompt");
    for (name, lark) in cases {
        let t = Instant::now();
        let g = env.compile(&lark, "").expect("compiles");
        let compile = t.elapsed();
        let (mut mask_time, mut masks, mut tokens, mut decode) =
            (std::time::Duration::ZERO, 0, 0, std::time::Duration::ZERO);
        for seed in 0..8 {
            let mut mask = g.mask();
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let opts = GenerateOptions {
                max_tokens: 160,
                ..GenerateOptions::default()
            };
            gen.reset();
            let c = gen
                .generate_constrained(
                    &prompt,
                    &params,
                    &opts,
                    Some(&mut mask as &mut dyn TokenConstraint),
                    &mut |_| ControlFlow::Continue(()),
                )
                .expect("generate");
            let (t, n) = mask.cost();
            mask_time += t;
            masks += n;
            tokens += c.completion_tokens;
            decode += c.timings.decode;
        }
        println!(
            "{name:12} compile {:7.2} ms | {tokens:4} tokens | mask {:7.1} us/token | decode {:7.3} ms/token | mask share {:.2}%",
            compile.as_secs_f64() * 1e3,
            mask_time.as_secs_f64() * 1e6 / masks.max(1) as f64,
            decode.as_secs_f64() * 1e3 / tokens.max(1) as f64,
            100.0 * mask_time.as_secs_f64() / decode.as_secs_f64().max(1e-9),
        );
    }
}
