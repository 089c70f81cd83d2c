//! The hub's layouts of a model's tensors, shown as the text model's own so
//! that every family, prep and the packs see one naming
//! (`model.layers.{l}...`, one tensor per expert projection):
//!
//! - a multimodal checkpoint's text model (`model.language_model.*`, as
//!   Qwen3.5/3.6 MoE ships) is renamed to `model.*`;
//! - heads mfx does not run are not listed: the vision tower
//!   (`model.visual.*`) and the multi-token-prediction head (`mtp.*`), so
//!   they are neither loaded nor written into packs;
//! - fused experts as transformers 5 saves them (`mlp.experts.gate_up_proj`
//!   `[E, 2I, H]`, gate in the first `I` rows of each expert, and
//!   `mlp.experts.down_proj` `[E, H, I]`) become per-expert
//!   `mlp.experts.{e}.{gate,up,down}_proj.weight`: byte ranges of the same
//!   mapping, no copy. gpt-oss's fused experts (`[E, H, 2I]`, interleaved,
//!   with `*_bias`) are another layout, left as they are for its family.

use super::safetensors::Entry;
use super::DType;
use crate::error::RuntimeError;
use std::collections::HashMap;

/// Prefixes of tensors that belong to heads mfx does not run.
const SKIPPED: [&str; 2] = ["model.visual.", "mtp."];
/// A multimodal checkpoint's text model.
const TEXT_MODEL: &str = "model.language_model.";
/// Fused experts: `{layer}.mlp.experts` + these.
const FUSED: [&str; 2] = [".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"];

/// Rewrites `tensors` (name -> entry) as described in the module docs;
/// `shard` names an entry's file in errors.
pub(super) fn normalize(
    tensors: &mut HashMap<String, Entry>,
    shard: impl Fn(usize) -> String,
) -> Result<(), RuntimeError> {
    tensors.retain(|n, _| !SKIPPED.iter().any(|p| n.starts_with(p)));

    let text: Vec<String> = tensors
        .keys()
        .filter(|n| n.starts_with(TEXT_MODEL))
        .cloned()
        .collect();
    for n in text {
        let to = format!("model.{}", &n[TEXT_MODEL.len()..]);
        let e = tensors.remove(&n).expect("listed above");
        if tensors.contains_key(&to) {
            return Err(RuntimeError::Safetensors {
                path: shard(e.shard).into(),
                msg: format!("both `{n}` and `{to}` are present"),
            });
        }
        tensors.insert(to, e);
    }

    let layers: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(FUSED[0]))
        .map(str::to_string)
        .collect();
    for layer in layers {
        let (gu_name, down_name) = (
            format!("{layer}{}", FUSED[0]),
            format!("{layer}{}", FUSED[1]),
        );
        if tensors.contains_key(&format!("{gu_name}_bias")) {
            continue; // gpt-oss
        }
        let gu = tensors[&gu_name].clone();
        let Some(down) = tensors.get(&down_name).cloned() else {
            return Err(RuntimeError::MissingTensor {
                name: down_name,
                location: shard(gu.shard),
            });
        };
        let shape_err = |name: &str, e: &Entry, expected: String| RuntimeError::Shape {
            name: name.into(),
            location: shard(e.shard),
            expected,
            found: e.shape.clone(),
        };
        let [n, i2, h] = gu.shape[..] else {
            return Err(shape_err(
                &gu_name,
                &gu,
                "[experts, 2 * intermediate, hidden]".into(),
            ));
        };
        if i2 % 2 != 0 || n == 0 {
            return Err(shape_err(
                &gu_name,
                &gu,
                "[experts, 2 * intermediate, hidden]".into(),
            ));
        }
        let i = i2 / 2;
        if down.shape != [n, h, i] {
            return Err(shape_err(&down_name, &down, format!("[{n}, {h}, {i}]")));
        }
        for (name, t) in [(&gu_name, &gu), (&down_name, &down)] {
            if !matches!(t.dtype, DType::F32 | DType::F16 | DType::Bf16) {
                return Err(RuntimeError::Dtype {
                    name: name.clone(),
                    location: shard(t.shard),
                    dtype: format!("{:?}", t.dtype),
                    expected: "f32, f16 or bf16".into(),
                });
            }
        }
        let part = |t: &Entry, start: usize, shape: [usize; 2]| Entry {
            shard: t.shard,
            dtype: t.dtype,
            shape: shape.to_vec(),
            start: t.start + start,
            len: shape[0] * shape[1] * t.dtype.size(),
        };
        let (gsz, dsz) = (gu.dtype.size(), down.dtype.size());
        for e in 0..n {
            let base = e * i2 * h * gsz;
            let name = |p: &str| format!("{layer}.mlp.experts.{e}.{p}.weight");
            tensors.insert(name("gate_proj"), part(&gu, base, [i, h]));
            tensors.insert(name("up_proj"), part(&gu, base + i * h * gsz, [i, h]));
            tensors.insert(name("down_proj"), part(&down, e * h * i * dsz, [h, i]));
        }
        tensors.remove(&gu_name);
        tensors.remove(&down_name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dtype: DType, shape: &[usize], start: usize) -> Entry {
        Entry {
            shard: 0,
            dtype,
            shape: shape.to_vec(),
            start,
            len: shape.iter().product::<usize>() * dtype.size(),
        }
    }

    fn run(t: Vec<(&str, Entry)>) -> Result<HashMap<String, Entry>, RuntimeError> {
        let mut m: HashMap<String, Entry> =
            t.into_iter().map(|(n, e)| (n.to_string(), e)).collect();
        normalize(&mut m, |_| "shard.safetensors".into()).map(|()| m)
    }

    #[test]
    fn multimodal_fused_layout_becomes_per_expert_text_model() {
        // 3 experts, I = 2, H = 5, bf16: gate_up is 3 x 4 x 5, down 3 x 5 x 2.
        let m = run(vec![
            (
                "model.language_model.layers.0.mlp.experts.gate_up_proj",
                entry(DType::Bf16, &[3, 4, 5], 1000),
            ),
            (
                "model.language_model.layers.0.mlp.experts.down_proj",
                entry(DType::Bf16, &[3, 5, 2], 5000),
            ),
            (
                "model.language_model.embed_tokens.weight",
                entry(DType::Bf16, &[7, 5], 0),
            ),
            (
                "model.language_model.layers.0.linear_attn.A_log",
                entry(DType::F32, &[4], 9000),
            ),
            (
                "model.visual.blocks.0.attn.qkv.weight",
                entry(DType::Bf16, &[6, 2], 0),
            ),
            (
                "mtp.layers.0.mlp.experts.0.gate_proj.weight",
                entry(DType::Bf16, &[2, 5], 0),
            ),
            ("lm_head.weight", entry(DType::Bf16, &[7, 5], 0)),
        ])
        .unwrap();
        let mut names: Vec<&str> = m.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names.len(), 3 + 9, "{names:?}");
        assert!(names
            .iter()
            .all(|n| !n.contains("visual") && !n.starts_with("mtp")));
        assert!(m.contains_key("model.embed_tokens.weight") && m.contains_key("lm_head.weight"));
        assert_eq!(m["model.layers.0.linear_attn.A_log"].dtype, DType::F32);
        // Expert 2: gate rows 0..2, up rows 2..4 of its [4, 5] block.
        let g = &m["model.layers.0.mlp.experts.2.gate_proj.weight"];
        let u = &m["model.layers.0.mlp.experts.2.up_proj.weight"];
        let d = &m["model.layers.0.mlp.experts.2.down_proj.weight"];
        assert_eq!(
            (g.shape.as_slice(), g.start, g.len),
            (&[2, 5][..], 1000 + 2 * 40, 20)
        );
        assert_eq!(
            (u.shape.as_slice(), u.start, u.len),
            (&[2, 5][..], 1000 + 2 * 40 + 20, 20)
        );
        assert_eq!(
            (d.shape.as_slice(), d.start, d.len),
            (&[5, 2][..], 5000 + 2 * 20, 20)
        );
    }

    #[test]
    fn gpt_oss_experts_and_plain_checkpoints_are_left_alone() {
        let t = vec![
            (
                "model.layers.0.mlp.experts.gate_up_proj",
                entry(DType::Bf16, &[2, 5, 4], 0),
            ),
            (
                "model.layers.0.mlp.experts.gate_up_proj_bias",
                entry(DType::Bf16, &[2, 4], 0),
            ),
            (
                "model.layers.0.mlp.experts.down_proj",
                entry(DType::Bf16, &[2, 2, 5], 0),
            ),
            (
                "model.layers.0.mlp.experts.0.gate_proj.weight",
                entry(DType::Bf16, &[2, 5], 0),
            ),
        ];
        let m = run(t.clone()).unwrap();
        let mut a: Vec<&String> = m.keys().collect();
        a.sort();
        let mut b: Vec<&str> = t.iter().map(|x| x.0).collect();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn inconsistent_fused_experts_are_named() {
        let e = run(vec![
            (
                "model.layers.3.mlp.experts.gate_up_proj",
                entry(DType::Bf16, &[2, 4, 5], 0),
            ),
            (
                "model.layers.3.mlp.experts.down_proj",
                entry(DType::Bf16, &[2, 5, 3], 0),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.layers.3.mlp.experts.down_proj") && e.contains("[2, 5, 2]"),
            "{e}"
        );
        let e = run(vec![(
            "model.layers.3.mlp.experts.gate_up_proj",
            entry(DType::Bf16, &[2, 4, 5], 0),
        )])
        .unwrap_err()
        .to_string();
        assert!(e.contains("model.layers.3.mlp.experts.down_proj"), "{e}");
        let e = run(vec![
            (
                "model.language_model.norm.weight",
                entry(DType::Bf16, &[5], 0),
            ),
            ("model.norm.weight", entry(DType::Bf16, &[5], 0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("both"), "{e}");
    }
}
