//! Fuzzes chat templates: compiling a hostile template (a pack's or a
//! checkpoint's `chat_template`) and rendering hostile messages with it
//! (what `mfx serve` receives). Input: template bytes, a NUL, then the
//! messages as a JSON array (else the rest is one user message's content).
//! Errors are fine; a panic, a hang or runaway memory is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mfx_runtime::chat::{message, ChatTemplate, RenderOptions};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (tmpl, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(tmpl) else {
        return;
    };
    let messages: Vec<Value> = match serde_json::from_slice::<Value>(rest) {
        Ok(Value::Array(a)) => a,
        _ => vec![
            message("system", "sys"),
            message("user", &String::from_utf8_lossy(rest)),
        ],
    };
    let Ok(t) = ChatTemplate::new(
        source.to_owned(),
        "fuzz".into(),
        Some("<s>".into()),
        Some("</s>".into()),
    ) else {
        return;
    };
    for add_generation_prompt in [false, true] {
        let opts = RenderOptions {
            add_generation_prompt,
            ..RenderOptions::default()
        };
        let _ = t.render(&messages, &opts);
    }
});
