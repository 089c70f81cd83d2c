//! Writes the seed corpora of every target (run without sanitizers):
//! `cargo run --release --bin make_seeds -- corpus [base/qwen3_moe.mfx]`.
//! The `pack_load` seeds need the base pack (docs/FUZZING.md says how to
//! make it); without it they are skipped with a message.

use mfx_formats::codec::Codec;
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn pack_reader(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    let tmp = dir.join("micro.mfx.src");
    mfx_formats::testing::write_micro_pack(&tmp).expect("write micro pack");
    let pack = std::fs::read(&tmp).expect("read micro pack");
    std::fs::remove_file(&tmp).expect("remove temp");
    for mode in [0u8, 1] {
        let mut seed = vec![mode];
        seed.extend_from_slice(&pack);
        write(dir, &format!("pack-mode{mode}"), &seed);
    }
    let raw: Vec<u8> = (0..600u32).map(|i| ((i * i) % 7) as u8 * 3).collect();
    for (mode, codec) in [(2u8, Codec::Huffman), (3, Codec::Zstd)] {
        let mut seed = vec![mode];
        seed.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        seed.extend_from_slice(&codec.encode(&raw));
        write(dir, &format!("blob-{}", codec.name()), &seed);
    }
}

/// The base pack's config (mode 0) and whole manifest (mode 1).
fn pack_load(dir: &Path, base: &Path) {
    let Ok(bytes) = std::fs::read(base) else {
        eprintln!(
            "SKIPPED pack_load seeds: no base pack at {} (docs/FUZZING.md)",
            base.display()
        );
        return;
    };
    let mo = u64::from_le_bytes(bytes[48..56].try_into().expect("8 bytes")) as usize;
    let manifest: serde_json::Value =
        serde_json::from_slice(&bytes[mo..]).expect("base manifest is JSON");
    let mut seed = vec![0u8];
    seed.extend(serde_json::to_vec_pretty(&manifest["config"]).expect("json"));
    write(dir, "config", &seed);
    let mut seed = vec![1u8];
    seed.extend_from_slice(&bytes[mo..]);
    write(dir, "manifest", &seed);
}

fn hub_manifest(dir: &Path) {
    let pack = |file: &str, label: &str, ram: u64, q: &str| {
        format!(
            r#"{{"file": "{file}", "ram_label": "{label}", "ram_bytes": {ram}, "size_bytes": 123456,
  "bits_per_weight": 4.5312, "sha256": "{}", "xxh3": "0123456789abcdef",
  "format_version": 1, "quality": {q}}}"#,
            "ab".repeat(32)
        )
    };
    let m = format!(
        r#"{{"format": "mfx-hub-manifest", "schema_version": 1,
 "writer": {{"name": "mfx", "version": "0.1.0"}},
 "packs": [{}, {}]}}
"#,
        pack("m-16G.mfx", "16G", 16 << 30, "null"),
        pack(
            "m-32G.mfx",
            "32G",
            32 << 30,
            r#"{"reference": "bf16", "domains": {"python": {"nll": 1.5, "delta_nll": 0.05}}}"#
        ),
    );
    write(dir, "two-packs.json", m.as_bytes());
}

fn chat_template(dir: &Path) {
    let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tools = "{%- if tools %}{{- '<tools>' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '</tools>' }}{%- endif %}\n{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.content is string %}{{- bos_token + m.role + ': ' + m.content.strip() }}{%- elif m.tool_calls %}{%- for c in m.tool_calls %}{{- c.function.name }}{{- c.function.arguments | tojson }}{%- endfor %}{%- endif %}{%- if loop.last and not add_generation_prompt %}{{ eos_token }}{%- endif %}{%- endfor %}";
    let raising = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first must be system') }}{% endif %}{{ messages | length }}{{ strftime_now('%Y') }}";
    let msgs = r#"[{"role": "system", "content": "You are a helper."}, {"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]"#;
    for (name, t) in [("chatml", chatml), ("tools", tools), ("raising", raising)] {
        let mut seed = t.as_bytes().to_vec();
        seed.push(0);
        seed.extend_from_slice(msgs.as_bytes());
        write(dir, name, &seed);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().unwrap_or_else(|| "corpus".into()));
    let base = PathBuf::from(args.next().unwrap_or_else(|| "base/qwen3_moe.mfx".into()));
    pack_reader(&root.join("pack_reader"));
    pack_load(&root.join("pack_load"), &base);
    hub_manifest(&root.join("hub_manifest"));
    chat_template(&root.join("chat_template"));
    println!("seeds written under {}", root.display());
}
