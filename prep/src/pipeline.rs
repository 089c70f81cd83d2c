//! The whole `mfx prep` run: resolve -> profile -> (merge) -> plan -> write
//! one pack per `--ram` budget, each with a report and a model card.

use crate::calib::{self, Tok};
use crate::entropy::{code_entropy, Measure};
use crate::error::{PrepError, Result};
use crate::gptq;
use crate::merge::{self, MergeOutcome};
use crate::pin::pin_by_mass;
use crate::plan::{self, LayerUse, Plan, PlanInput};
use crate::prune::{self, Pruning};
use crate::quantize::{self, DenseTensor, Stored};
use crate::report::{self, CodecStats, PackReport};
use crate::routing::{self, CalibBatch, LayerStats};
use crate::source::{resolve_model, ExpertWeights, Source, SourceExperts};
use mfx_formats::codec::Codec;
use mfx_formats::pack::{PackMeta, PackWriter, PartData};
use mfx_formats::profile::{PinRule, Profile, PROFILE_SCHEMA, PROFILE_VERSION};
use mfx_formats::quant::{Scheme, AFFINE_BITS};
use mfx_runtime::cache::human;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    pub model: String,
    /// `(label as typed, bytes)` per budget.
    pub rams: Vec<(String, u64)>,
    /// Output path; with several budgets it must contain `{ram}`.
    pub output: String,
    pub calib: Vec<PathBuf>,
    /// Calibration as token ids (files of whitespace- or comma-separated
    /// ids), for checkpoints without a tokenizer.json.
    pub calib_ids: Vec<PathBuf>,
    pub calib_rows: usize,
    pub calib_seq: usize,
    pub profile: Option<PathBuf>,
    pub save_profile: Option<PathBuf>,
    pub pin_mass: f64,
    pub hot_bits: u8,
    pub cold_bits: u8,
    pub dense_bits: u8,
    pub group_size: u32,
    pub hot_fraction: Option<f64>,
    /// `--merge`: merge experts that compute nearly the same function.
    pub merge: Option<merge::MergeMode>,
    /// `--task`: the built-in calibration mix.
    pub task: calib::Task,
    pub merge_max_nll: f64,
    /// Share of each MoE layer's experts removed by saliency (0: none).
    pub prune: f64,
    /// `--prune-by`: how pruning (and merging's ranking) scores experts.
    pub prune_by: prune::SaliencyKind,
    pub min_codec_saving: f64,
    /// Choose expert codes below 8 bits by GPTQ on the calibration batch
    /// instead of rounding to nearest.
    pub gptq: bool,
    /// Blob alignment in the pack (bytes; a power of two in 4 KiB ..= 1 MiB).
    pub align: u32,
    pub report: Option<PathBuf>,
    /// Texts to measure each pack's NLL on (reference protocol).
    pub eval_data: Vec<PathBuf>,
    pub eval_rows: usize,
    pub model_card: bool,
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: String::new(),
            rams: Vec::new(),
            output: String::new(),
            calib: Vec::new(),
            calib_ids: Vec::new(),
            calib_rows: 16,
            calib_seq: 512,
            profile: None,
            save_profile: None,
            pin_mass: 0.8,
            hot_bits: 4,
            cold_bits: 2,
            dense_bits: 8,
            group_size: 64,
            hot_fraction: None,
            merge: None,
            task: calib::Task::General,
            merge_max_nll: 0.02,
            prune: 0.0,
            prune_by: prune::SaliencyKind::Total,
            min_codec_saving: crate::entropy::DEFAULT_MIN_SAVING,
            gptq: false,
            align: mfx_formats::pack::DEFAULT_ALIGNMENT,
            report: None,
            eval_data: Vec::new(),
            eval_rows: 64,
            model_card: true,
            progress: false,
        }
    }
}

/// What one run produced.
pub struct Outcome {
    pub profile: Profile,
    pub packs: Vec<PackReport>,
    pub calib_nll: Option<f64>,
    pub merge: Option<MergeOutcome>,
    /// Which experts `--prune` removed.
    pub prune: Option<Pruning>,
    /// NLL of the unquantized source on each `--eval-data` text.
    pub source_eval: Vec<(String, f64)>,
    /// Whether the model suits streaming (shape and measured routing).
    pub suitability: crate::suitability::Suitability,
}

fn check_options(o: &Options) -> Result<()> {
    for (flag, b) in [("--hot-bits", o.hot_bits), ("--cold-bits", o.cold_bits)] {
        if !AFFINE_BITS.contains(&b) {
            return Err(PrepError::Option(format!(
                "{flag} {b}: expected one of 2, 3, 4, 6, 8"
            )));
        }
    }
    if !quantize::DENSE_BITS.contains(&o.dense_bits) {
        return Err(PrepError::Option(format!(
            "--dense-bits {}: dense weights are stored at 8 or 4 bits, never lower",
            o.dense_bits
        )));
    }
    if o.cold_bits > o.hot_bits {
        return Err(PrepError::Option(format!(
            "--cold-bits {} is above --hot-bits {}",
            o.cold_bits, o.hot_bits
        )));
    }
    Scheme::affine(4, o.group_size)?;
    if !o.align.is_power_of_two() || !(4096..=1 << 20).contains(&o.align) {
        return Err(PrepError::Option(format!(
            "--align {}: expected a power of two from 4096 to 1048576 bytes (the reader's O_DIRECT reads need 4 KiB)",
            o.align
        )));
    }
    if let Some(f) = o.hot_fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(PrepError::Option(format!(
                "--hot-fraction {f}: expected a fraction in [0, 1]"
            )));
        }
    }
    if !(0.0..=1.0).contains(&o.pin_mass) {
        return Err(PrepError::Option(format!(
            "--pin-mass {}: expected a fraction in [0, 1]",
            o.pin_mass
        )));
    }
    if o.rams.len() > 1 && !o.output.contains("{ram}") {
        return Err(PrepError::Option(format!(
            "several --ram budgets need an -o pattern with {{ram}}, e.g. model-{{ram}}.mfx (got {})",
            o.output
        )));
    }
    if !(0.0..1.0).contains(&o.prune) {
        return Err(PrepError::Option(format!(
            "--prune {}: expected a fraction in [0, 1)",
            o.prune
        )));
    }
    if o.prune > 0.0 && o.merge.is_some() {
        return Err(PrepError::Option(
            "--prune and --merge together are not supported: choose one".into(),
        ));
    }
    if o.calib_rows == 0 || o.calib_seq < 2 {
        return Err(PrepError::Option(
            "--calib-rows must be >= 1 and --calib-seq >= 2".into(),
        ));
    }
    Ok(())
}

pub fn output_path(pattern: &str, ram_label: &str) -> PathBuf {
    PathBuf::from(pattern.replace("{ram}", ram_label))
}

/// Fails early (before hours of profiling) if an output cannot be created.
fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(PrepError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("directory {} does not exist", dir.display()),
            ),
        });
    }
    if path.is_dir() {
        return Err(PrepError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other("is a directory"),
        });
    }
    let probe = dir.join(format!(".mfx-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| PrepError::Write {
        path: path.to_path_buf(),
        source: e,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Loads the checkpoint's tokenizer.json and renders its chat template
/// once, before any profiling, so that a garbage file fails prep naming it
/// instead of being embedded and failing only at `mfx run` (issue 16). A
/// checkpoint without a tokenizer (token-id-only test fixtures) or without
/// a template (a base model) is fine.
pub fn check_tokenizer_and_template(dir: &Path) -> Result<()> {
    use mfx_runtime::chat::{message, ChatTemplate, RenderOptions};
    let tok_path = dir.join("tokenizer.json");
    if tok_path.exists() {
        let bad = |msg: String| PrepError::Tokenizer {
            path: tok_path.clone(),
            msg,
        };
        let tok = mfx_runtime::tokenizer::Tokenizer::from_file(&tok_path)
            .map_err(|e| bad(format!("cannot load: {e}")))?;
        let ids = tok
            .encode("Hello, world! def f(x): return x", false)
            .map_err(|e| bad(format!("cannot encode a sample text: {e}")))?;
        if ids.is_empty() || tok.vocab_size() == 0 {
            return Err(bad(
                "encodes a sample text to no tokens (empty vocabulary?)".into(),
            ));
        }
        tok.decode(&ids, false)
            .map_err(|e| bad(format!("cannot decode its own tokens: {e}")))?;
    }
    // Errors from the template name its file (chat_template.jinja or
    // tokenizer_config.json) through the template's origin.
    let bad = |e: &dyn std::fmt::Display| PrepError::BadFile {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    };
    if let Some(t) = ChatTemplate::from_model_dir(dir).map_err(|e| bad(&e))? {
        // One user message: the conversation every template must accept
        // (some refuse a system role or non-alternating turns on purpose).
        let msgs = [message("user", "Hello")];
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..RenderOptions::default()
        };
        t.render(&msgs, &opts).map_err(|e| bad(&e))?;
    }
    Ok(())
}

fn read_opt(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Builds the budget-independent profile from routing stats.
pub fn build_profile(
    ck: &Source,
    stats: Vec<LayerStats>,
    calibration: mfx_formats::profile::Calibration,
    pin_mass: f64,
) -> Profile {
    let layers = stats
        .into_iter()
        .map(|s| {
            let pinned = pin_by_mass(&s.gate_mass, &s.counts, pin_mass, 0);
            s.into_profile(pinned)
        })
        .collect();
    Profile {
        schema: PROFILE_SCHEMA.into(),
        version: PROFILE_VERSION,
        model: ck.identity(),
        calibration,
        pin_rule: PinRule {
            mass_threshold: pin_mass,
            max_per_layer: 0,
        },
        layers,
    }
}

pub fn run(o: &Options, log: &dyn Fn(&str)) -> Result<Outcome> {
    let t0 = Instant::now();
    check_options(o)?;
    let outputs: Vec<PathBuf> = o
        .rams
        .iter()
        .map(|(l, _)| output_path(&o.output, l))
        .collect();
    for p in &outputs {
        check_writable(p)?;
    }
    let dir = resolve_model(&o.model)?;
    check_tokenizer_and_template(&dir)?;
    let ck = Source::open(&dir)?;
    let (top_k, n_experts) = (ck.top_k(), ck.experts());
    log(&format!(
        "model {} ({}, {} layers, {} experts, top-{}), {} of safetensors",
        dir.display(),
        ck.model_type(),
        ck.layers(),
        n_experts,
        top_k,
        human(ck.input_bytes())
    ));

    if o.prune > 0.0 && !prune::PRUNABLE.contains(&ck.model_type()) {
        return Err(PrepError::Option(format!(
            "--prune: {} is a {} model; pruning cuts one [experts, hidden] router per layer and supports {}",
            dir.display(),
            ck.model_type(),
            prune::PRUNABLE.join(", ")
        )));
    }

    // Sizes first: a budget that cannot work is refused before any profiling.
    let mut dense = quantize::dense_tensors(&ck, o.dense_bits, o.group_size)?;
    let dense_bytes: u64 = dense
        .iter()
        .map(quantize::dense_bytes)
        .sum::<Result<u64>>()?;
    let moe_layers = ck.moe_layers();
    // Experts are sized from one of them as it will be stored: MXFP4
    // projections as they are, biases included.
    let (hot_bytes, cold_bytes) = match moe_layers.first() {
        Some(&l) => {
            let sample = ck.expert(l, 0)?;
            (
                quantize::expert_bytes_of(&sample, o.hot_bits, o.group_size)?,
                quantize::expert_bytes_of(&sample, o.cold_bits, o.group_size)?,
            )
        }
        None => (
            quantize::expert_bytes(ck.hidden(), ck.moe_inter(), o.hot_bits, o.group_size)?,
            quantize::expert_bytes(ck.hidden(), ck.moe_inter(), o.cold_bits, o.group_size)?,
        ),
    };
    let (working, expert_buffers) = (plan::working_bytes(&ck.family), plan::expert_buffers());
    let needs = plan::model_needs(
        dense_bytes,
        hot_bytes.max(cold_bytes),
        top_k,
        moe_layers.len(),
        working + expert_buffers * hot_bytes.max(cold_bytes),
    );
    let what = format!(
        "{} at --dense-bits {} and --hot-bits {}",
        dir.display(),
        o.dense_bits,
        o.hot_bits
    );
    for (label, ram) in &o.rams {
        plan::check_ram(*ram, label, &what, &needs)?;
    }

    // Stage 1/2: routing profile (or a reused one).
    let mut calib_nll = None;
    let mut calib_batch = None;
    let mut saliency: Vec<(usize, Vec<f64>)> = Vec::new();
    let profile = if let Some(p) = &o.profile {
        let prof = Profile::load(p)?;
        prof.check_model(&ck.identity())?;
        log(&format!(
            "reusing profile {} ({} calibration tokens); skipping stage 1",
            p.display(),
            prof.calibration.tokens
        ));
        prof
    } else {
        let batch = calibration_batch(o, &dir, &ck)?;
        log(&format!(
            "stage 1: profiling routing over {} calibration tokens ({} rows x {})",
            batch.ids.len(),
            batch.rows,
            batch.seq
        ));
        let t = Instant::now();
        let bar = progress_bar(o.progress, ck.layers() as u64, "profile");
        let (stats, nll) = routing::profile_source(&ck, &batch, o.merge.is_some(), &|done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        log(&format!("  profiled in {:.1}s", t.elapsed().as_secs_f64()));
        calib_nll = nll;
        saliency = stats
            .iter()
            .map(|s| (s.layer, s.saliency(o.prune_by)))
            .collect();
        let prof = build_profile(&ck, stats, batch.calibration.clone(), o.pin_mass);
        calib_batch = Some(batch);
        prof
    };
    if let Some(p) = &o.save_profile {
        crate::write_atomic(p, prof_json(&profile).as_bytes())?;
        log(&format!("profile written to {}", p.display()));
    }

    // Expert saliency over the calibration batch, which pruning removes by
    // and merging ranks by: measured in stage 1, or now when stage 1 was
    // skipped (a reused profile).
    if saliency.is_empty() && (o.prune > 0.0 || o.merge.is_some()) {
        let batch = match calib_batch.take() {
            Some(b) => b,
            None => calibration_batch(o, &dir, &ck)?,
        };
        log(&format!(
            "measuring expert saliency over {} calibration tokens",
            batch.ids.len()
        ));
        let (stats, _) = routing::profile_source(&ck, &batch, false, &|_, _| {})?;
        saliency = stats
            .iter()
            .map(|s| (s.layer, s.saliency(o.prune_by)))
            .collect();
        calib_batch = Some(batch);
    }

    // Stage 3a: pruning (optional).
    let pruning = if o.prune > 0.0 {
        let p = prune::choose(&saliency, n_experts, top_k, o.prune, o.prune_by)?;
        log(&format!(
            "--prune {}: {} of {} experts kept per MoE layer ({:?} saliency over {} calibration tokens)",
            o.prune, p.experts_after, p.experts_before, o.prune_by, profile.calibration.tokens
        ));
        for t in &mut dense {
            if let Some(rows) = p.router_rows(&t.module, t.shape[0]) {
                t.keep_rows = Some((t.shape[0], rows.to_vec()));
                t.shape[0] = rows.len() as u64;
            }
        }
        Some(p)
    } else {
        None
    };
    let dense_bytes: u64 = dense
        .iter()
        .map(quantize::dense_bytes)
        .sum::<Result<u64>>()?;
    let (profile, n_experts) = match &pruning {
        Some(p) => (p.remap_profile(&profile), p.experts_after),
        None => (profile, n_experts),
    };

    // Stage 3: merging (optional).
    let merge_outcome = if let Some(mode) = o.merge {
        let batch = match calib_batch.take() {
            Some(b) => b,
            None => calibration_batch(o, &dir, &ck)?,
        };
        let m = merge::run(&ck, &profile, &batch, mode, o.merge_max_nll, &saliency, log)?;
        Some(m)
    } else {
        None
    };

    // Quality baseline: the source model on the evaluation texts.
    let eval_texts = if o.eval_data.is_empty() {
        Vec::new()
    } else {
        calib::read_texts(&o.eval_data)?
    };
    let eval_tok = if eval_texts.is_empty() {
        None
    } else {
        Some(Tok::load(&dir, None)?)
    };
    let mut source_ref = Vec::new();
    if let Some(tok) = &eval_tok {
        let t = Instant::now();
        source_ref = crate::eval::source_per_text(
            ck.model.as_ref(),
            &ck.weights,
            tok,
            &eval_texts,
            o.eval_rows,
            o.calib_seq,
            &SourceExperts(&ck),
        )?;
        for crate::eval::SourceEval {
            name: n, nll: v, ..
        } in &source_ref
        {
            log(&format!("  source NLL on {n}: {v:.4}"));
        }
        log(&format!(
            "  (source evaluation took {:.1}s)",
            t.elapsed().as_secs_f64()
        ));
    }

    // GPTQ's statistics need the calibration rows again (stage 1 keeps
    // only counts); tokenizing them is cheap next to the pass itself.
    let gptq_batch = if o.gptq {
        Some(calibration_batch(o, &dir, &ck)?)
    } else {
        None
    };

    // Stage 4-6: per budget.
    let mut packs = Vec::new();
    for ((label, ram), out) in o.rams.iter().zip(&outputs) {
        let layers: Vec<LayerUse> = profile
            .layers
            .iter()
            .map(|l| LayerUse {
                layer: l.layer,
                counts: &l.counts,
                gate_mass: &l.gate_mass,
                alias_of: merge_outcome
                    .as_ref()
                    .and_then(|m| m.layer_map(l.layer as usize)),
            })
            .collect();
        let pl = plan::plan(&PlanInput {
            ram: *ram,
            dense_bytes,
            hot_bytes,
            cold_bytes,
            working,
            expert_buffers,
            top_k,
            experts: n_experts,
            layers,
            hot_fraction: o.hot_fraction,
            pin_mass: o.pin_mass,
        })?;
        log(&format!("--ram {label}: {}", pl.reason));
        let t = Instant::now();
        let mut rep = write_pack(
            &ck,
            &dir,
            o,
            &profile,
            &pl,
            &dense,
            merge_outcome.as_ref(),
            pruning.as_ref(),
            out,
            label,
            gptq_batch.as_ref(),
        )?;
        if !source_ref.is_empty() {
            // The pack just written, through the runtime's loader and
            // forward, against the source on the same rows.
            let ev = crate::eval::pack_per_text(out, ck.model.as_ref(), &source_ref)?;
            for (e, r) in ev.iter().zip(&source_ref) {
                log(&format!(
                    "  pack NLL on {}: {:.4} (source {:.4}, {:+.2}%), KLD {:.5} (p99 {:.4}), top-1 agreement {:.2}%",
                    e.name,
                    e.nll,
                    r.nll,
                    (e.nll - r.nll) / r.nll * 100.0,
                    e.kld.mean,
                    e.kld.p99,
                    e.kld.top1_agreement * 100.0
                ));
            }
            rep.eval_nll = ev.iter().map(|e| (e.name.clone(), e.nll)).collect();
            rep.eval_kld = ev.into_iter().map(|e| (e.name, e.kld)).collect();
        }
        log(&format!(
            "  wrote {} ({}) in {:.1}s: {:.2} bits/weight, {} pinned experts ({:.0}% of routed tokens), predicted hit rate {:.1}%",
            out.display(),
            human(rep.file_bytes),
            t.elapsed().as_secs_f64(),
            rep.bits_per_weight,
            rep.pinned_experts,
            rep.pinned_token_share * 100.0,
            rep.predicted_hit_rate * 100.0
        ));
        packs.push(rep);
    }
    let source_eval = source_ref.into_iter().map(|r| (r.name, r.nll)).collect();
    let dense_params: u64 = dense.iter().map(|t| t.shape.iter().product::<u64>()).sum();
    let suitability = crate::suitability::assess(
        &profile,
        n_experts,
        top_k,
        ck.moe_layers().len(),
        dense_params,
        3 * (ck.hidden() * ck.moe_inter()) as u64,
        dense.iter().any(|t| t.name.contains("shared_expert")),
    );
    log(&format!("suitability: {}", suitability.verdict));
    let outcome = Outcome {
        suitability,
        profile,
        packs,
        calib_nll,
        merge: merge_outcome,
        prune: pruning,
        source_eval,
    };
    let full = report::full_report(
        &dir,
        o,
        &outcome,
        t0.elapsed().as_secs_f64(),
        ck.input_bytes(),
    );
    if let Some(r) = &o.report {
        crate::write_atomic(r, full.as_bytes())?;
    }
    if o.model_card {
        // One card per output directory: it describes the first pack written
        // there and lists every pack of this run beside it.
        let mut done: Vec<PathBuf> = Vec::new();
        for (rep, out) in outcome.packs.iter().zip(&outputs) {
            let parent = out.parent().map(Path::to_path_buf).unwrap_or_default();
            if done.contains(&parent) {
                continue;
            }
            done.push(parent);
            let path = report::write_model_card(out, &dir, &ck, rep, &outcome)?;
            log(&format!("  model card {}", path.display()));
        }
    }
    Ok(outcome)
}

/// The calibration batch: `--calib-ids` token files as they are, else
/// `--calib` texts (or the built-in set) through the model's tokenizer.
fn calibration_batch(o: &Options, dir: &Path, ck: &Source) -> Result<CalibBatch> {
    if !o.calib_ids.is_empty() {
        return routing::id_rows(&o.calib_ids, o.calib_rows, o.calib_seq);
    }
    let eos = ck
        .raw
        .get("eos_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    let tok = Tok::load(dir, eos)?;
    let texts = if o.calib.is_empty() {
        calib::builtin_texts(o.task)
    } else {
        calib::read_texts(&o.calib)?
    };
    routing::tokenize(&tok, &texts, o.calib_rows, o.calib_seq)
}

fn prof_json(p: &Profile) -> String {
    p.to_json()
}

fn progress_bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(s) =
        indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {elapsed}")
    {
        b.set_style(s.progress_chars("=> "));
    }
    b.set_prefix(what.to_string());
    b
}

/// One expert, quantized and measured, ready to append.
struct ExpertOut {
    parts: [(Scheme, Vec<u64>, Stored); 3],
    /// The expert's bias parts (gpt-oss), after the projections.
    bias: Vec<quantize::BiasPart>,
    /// Mean bits per weight of its codes: `bits`, or 4.25 for a projection
    /// stored as MXFP4.
    code_bits: f64,
    codec: Codec,
    measure: Measure,
    entropy_bits: f64,
    bits: u8,
}

#[allow(clippy::too_many_arguments)]
fn write_pack(
    ck: &Source,
    dir: &Path,
    o: &Options,
    profile: &Profile,
    pl: &Plan,
    dense: &[DenseTensor],
    merge: Option<&MergeOutcome>,
    pruning: Option<&Pruning>,
    out: &Path,
    ram_label: &str,
    gptq_batch: Option<&CalibBatch>,
) -> Result<PackReport> {
    let (hidden, inter) = (ck.hidden(), ck.moe_inter());
    let n_experts = pruning.map_or(ck.experts(), |p| p.experts_after);
    let pack_profile = pack_profile(profile, pl);
    let generation: serde_json::Value = read_opt(&dir.join("generation_config.json"))
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    let chat_template = read_opt(&dir.join("chat_template.jinja")).or_else(|| {
        read_opt(&dir.join("tokenizer_config.json"))
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
    });
    // A checkpoint without a tokenizer (the random-weight test fixtures) gives
    // a pack that runs on token ids only (`mfx eval logits/greedy --ids`).
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = if tok_path.is_file() {
        std::fs::read_to_string(&tok_path).map_err(crate::error::io_err(&tok_path))?
    } else {
        String::new()
    };
    let meta = PackMeta {
        config: pruning.map_or_else(|| ck.raw.clone(), |p| p.config(&ck.raw)),
        tokenizer_json,
        chat_template,
        generation,
        pin_profile: serde_json::to_value(&pack_profile).ok(),
        routing_summary: Some(report::routing_summary(profile)),
        provenance: report::provenance(dir, o, ram_label, ck, pl),
    };
    let mut w =
        PackWriter::create(out, meta, o.align).map_err(|e| PrepError::Pack(e.to_string()))?;
    let mut stats = CodecStats::default();
    let mut weights_total = 0u64;
    let mut dense_stored = 0u64;
    for t in dense {
        let s = quantize::encode_dense(ck, t)?;
        let parts = s.parts();
        if let (Stored::Affine(a), Scheme::Affine { bits, .. }) = (&s, t.scheme) {
            let raw: Vec<u8> = parts.concat();
            stats.add_dense(&Measure::of(&raw), code_entropy(&a.packed, bits), bits);
        }
        w.add_tensor(&t.name, t.scheme, &t.shape, &parts)
            .map_err(|e| PrepError::Pack(e.to_string()))?;
        let n: u64 = t.shape.iter().product();
        weights_total += n;
        dense_stored += quantize::dense_bytes(t)?;
    }
    ck.release_pages();
    let mut expert_stored = 0u64;
    let mut expert_raw = 0u64;
    let mut expert_weights = 0u64;
    let mut bit_weighted = 0f64;
    let mut write_layer =
        |lp: &plan::LayerPlan, hess: Option<&gptq::LayerHessians>| -> Result<()> {
            let l = lp.layer as usize;
            let mut hot = vec![false; n_experts];
            for &h in &lp.hot {
                hot[h as usize] = true;
            }
            let map = merge.and_then(|m| m.layer_map(l));
            let reps: Vec<usize> = (0..n_experts)
                .filter(|&e| map.is_none_or(|m| m[e] as usize == e))
                .collect();
            let chunk = rayon::current_num_threads().max(1) * 4;
            for group in reps.chunks(chunk) {
                let outs: Vec<Result<(usize, ExpertOut)>> = group
                    .par_iter()
                    .map(|&e| {
                        let bits = if hot[e] { o.hot_bits } else { o.cold_bits };
                        // A pruned pack's expert `e` is the `e`-th kept one.
                        let src_e = pruning.and_then(|p| p.kept(l)).map_or(e, |k| k[e] as usize);
                        let merged = merge.and_then(|m| m.weights(l, e));
                        // GPTQ needs the inputs this expert saw; a merged
                        // expert's are a mix, so it is rounded to nearest.
                        let h = hess.filter(|_| merged.is_none() && bits < 8).and_then(|h| {
                            Some((h.input.get(src_e)?.as_ref()?, h.mid.get(src_e)?.as_ref()?))
                        });
                        let ew = match merged {
                            Some(wts) => wts,
                            None => ck.expert(l, src_e)?,
                        };
                        encode_expert(&ew, bits, o.group_size, o.min_codec_saving, l, e, h)
                            .map(|x| (e, x))
                    })
                    .collect();
                for r in outs {
                    let (e, x) = r?;
                    // Merged experts pointing at `e` come right after it in id order
                    // only if larger; the writer needs ascending ids, so add
                    // representatives and aliases in one sorted pass below.
                    let parts = part_data(&x.parts, &x.bias);
                    let n_alias = map.map_or(0, |m| {
                        m.iter()
                            .enumerate()
                            .filter(|(i, r)| **r as usize == e && *i != e)
                            .count()
                    });
                    pending_add(&mut w, l as u32, e as u32, x.codec, &parts, map)?;
                    let per = x.measure.stored(x.codec);
                    expert_stored += per;
                    expert_raw += x.measure.raw;
                    let nweights = 3 * (hidden * inter) as u64;
                    expert_weights += nweights * (1 + n_alias as u64);
                    bit_weighted += x.code_bits * nweights as f64 * (1 + n_alias) as f64;
                    stats.add_expert(&x.measure, x.codec, x.entropy_bits, x.bits);
                }
            }
            ck.release_pages();
            Ok(())
        };
    match gptq_batch {
        // GPTQ: the calibration batch walks the source layer by layer and
        // each MoE layer's experts are written as soon as their statistics
        // are complete, so only one layer's Hessians are ever held.
        Some(batch) => {
            let bar = progress_bar(o.progress, ck.layers() as u64, "gptq");
            crate::routing::walk_layers(
                ck.model.as_ref(),
                &ck.weights,
                batch,
                &SourceExperts(ck),
                &|done, _| bar.set_position(done as u64),
                &|| ck.release_pages(),
                |l, moe, ex| gptq::Collector::new(l, ck.experts(), hidden, moe.then(|| ex.clone())),
                |l, _, obs| match pl.layers.iter().find(|lp| lp.layer as usize == l) {
                    Some(lp) => write_layer(lp, Some(&obs.finish()?)),
                    None => Ok(()),
                },
            )?;
            bar.finish_and_clear();
        }
        None => {
            for lp in &pl.layers {
                write_layer(lp, None)?;
            }
        }
    }
    let summary = w.finish().map_err(|e| PrepError::Pack(e.to_string()))?;
    weights_total += expert_weights;
    let pinned: usize = pl.layers.iter().map(|l| l.pinned.len()).sum();
    let share = pinned_share(profile, pl);
    Ok(PackReport {
        path: out.display().to_string(),
        ram_label: ram_label.to_string(),
        ram: pl.ram,
        file_bytes: summary.file_length,
        dense_bytes: dense_stored,
        expert_raw_bytes: expert_raw,
        expert_stored_bytes: expert_stored,
        bits_per_weight: ((dense_stored + expert_stored) as f64 * 8.0)
            / weights_total.max(1) as f64,
        eval_nll: Vec::new(),
        eval_kld: Vec::new(),
        expert_code_bits: bit_weighted / expert_weights.max(1) as f64,
        pinned_experts: pinned,
        total_experts: pl.layers.len() * n_experts,
        pinned_token_share: share,
        predicted_hit_rate: pl.predicted_hit_rate,
        hot_fraction: pl.hot_fraction,
        plan: pl.clone(),
        codecs: stats,
    })
}

/// Adds expert `e` and, right after, nothing else: merged aliases are added
/// by `add_aliases` in id order. The writer wants strictly ascending ids, so
/// with merging we add each representative, then later aliases in order.
fn pending_add(
    w: &mut PackWriter,
    l: u32,
    e: u32,
    codec: Codec,
    parts: &[PartData],
    map: Option<&[u32]>,
) -> Result<()> {
    // Aliases with a smaller id than their representative must be added
    // before it; the merge stage guarantees the representative is the
    // smallest id of its cluster, so aliases always come later. Add the
    // aliases that fall between e and the next representative.
    w.add_expert(l, e, codec, parts)
        .map_err(|err| PrepError::Pack(err.to_string()))?;
    if let Some(m) = map {
        let mut a = e as usize + 1;
        while a < m.len() && m[a] as usize != a {
            w.add_merged_expert(l, a as u32, m[a])
                .map_err(|err| PrepError::Pack(err.to_string()))?;
            a += 1;
        }
    }
    Ok(())
}

/// Quantizes one expert; with `hess` (its inputs' and intermediate
/// activations' Hessians) the affine projections are chosen by GPTQ,
/// otherwise rounded to nearest.
fn encode_expert(
    ew: &ExpertWeights,
    bits: u8,
    group: u32,
    min_saving: f64,
    l: usize,
    e: usize,
    hess: Option<(&gptq::Hessian, &gptq::Hessian)>,
) -> Result<ExpertOut> {
    // gate and up share their inputs, so one factor serves both.
    let factors = hess.and_then(|(input, mid)| {
        Some((
            gptq::Factor::of(input, gptq::DAMP)?,
            gptq::Factor::of(mid, gptq::DAMP)?,
        ))
    });
    let name = |p: &str| format!("model.layers.{l}.mlp.experts.{e}.{p}");
    let mut parts = Vec::with_capacity(3);
    let mut raw_parts: Vec<PartData> = Vec::new();
    let _ = &mut raw_parts;
    let mut ent = 0f64;
    let mut code_bits = 0f64;
    for (k, (p, m)) in [
        ("gate_proj", &ew.gate),
        ("up_proj", &ew.up),
        ("down_proj", &ew.down),
    ]
    .into_iter()
    .enumerate()
    {
        // MXFP4 sources (gpt-oss) keep their bytes whatever `bits` says.
        if let Some(src) = &ew.mxfp4[k] {
            if let Some((scheme, s)) = quantize::as_is(src, &name(p))? {
                if let Stored::Mxfp4(q) = &s {
                    ent += code_entropy(&q.blocks, 4) / 3.0;
                }
                // A 4-bit code per weight and an 8-bit scale per block.
                let block = mfx_formats::mxfp4::BLOCK as f64;
                code_bits += (4.0 + 8.0 / block) / 3.0;
                parts.push((scheme, vec![m.rows as u64, m.cols as u64], s));
                continue;
            }
        }
        let g = quantize::group_for(m.cols, group).ok_or_else(|| PrepError::Tensor {
            name: name(p),
            msg: format!("{} columns is not a multiple of 32", m.cols),
        })?;
        let scheme = Scheme::affine(bits, g)?;
        let s = match &factors {
            Some((fi, fm)) => {
                quantize::check_finite(&m.data, m.cols, &name(p))?;
                let f = if k == 2 { fm } else { fi };
                Stored::Affine(gptq::quantize(
                    &m.data,
                    m.rows,
                    m.cols,
                    bits,
                    g as usize,
                    f,
                    &name(p),
                )?)
            }
            None => quantize::quantize_mat(m, scheme, &name(p))?,
        };
        code_bits += bits as f64 / 3.0;
        if let Stored::Affine(a) = &s {
            ent += code_entropy(&a.packed, bits) / 3.0;
        }
        parts.push((scheme, vec![m.rows as u64, m.cols as u64], s));
    }
    let bias = match &ew.bias {
        Some(b) => quantize::bias_parts(b, &format!("model.layers.{l}.mlp.experts.{e}"))?,
        None => Vec::new(),
    };
    let pd = part_data(&parts, &bias);
    let (raw, _) = PackWriter::build_expert_blob(&format!("L{l} E{e}"), &pd)
        .map_err(|err| PrepError::Pack(err.to_string()))?;
    let measure = Measure::of(&raw);
    let codec = measure.choose(min_saving);
    let mut it = parts.into_iter();
    let (a, b, cc) = match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err(PrepError::Pack("expert parts".into())),
    };
    Ok(ExpertOut {
        parts: [a, b, cc],
        bias,
        code_bits,
        codec,
        measure,
        entropy_bits: ent,
        bits,
    })
}

/// An expert's pack parts: the three projections under their canonical
/// names, then its bias parts, if any (docs/FORMAT.md 6.2).
fn part_data<'a>(
    proj: &'a [(Scheme, Vec<u64>, Stored)],
    bias: &'a [quantize::BiasPart],
) -> Vec<PartData<'a>> {
    let mut pd: Vec<PartData> = ["gate_proj", "up_proj", "down_proj"]
        .iter()
        .zip(proj)
        .map(|(n, (scheme, shape, s))| PartData {
            name: n.to_string(),
            scheme: *scheme,
            shape: shape.clone(),
            bytes: s.parts(),
        })
        .collect();
    pd.extend(bias.iter().map(|b| PartData {
        name: b.name.to_string(),
        scheme: b.scheme,
        shape: vec![b.len as u64],
        bytes: vec![&b.bytes],
    }));
    pd
}

/// The profile embedded in a pack: the measured counts with `pinned` set to
/// what this budget actually pins.
fn pack_profile(profile: &Profile, pl: &Plan) -> Profile {
    let mut p = profile.clone();
    for lp in &mut p.layers {
        if let Some(x) = pl.layers.iter().find(|x| x.layer == lp.layer) {
            lp.pinned = x.pinned.clone();
        }
    }
    p.pin_rule.max_per_layer = pl
        .layers
        .iter()
        .map(|l| l.pinned.len() as u32)
        .max()
        .unwrap_or(0);
    p
}

fn pinned_share(profile: &Profile, pl: &Plan) -> f64 {
    let (mut hit, mut tot) = (0u64, 0u64);
    for lp in &pl.layers {
        if let Some(l) = profile.layer(lp.layer) {
            tot += l.counts.iter().sum::<u64>();
            hit += lp.pinned.iter().map(|&e| l.counts[e as usize]).sum::<u64>();
        }
    }
    if tot == 0 {
        0.0
    } else {
        hit as f64 / tot as f64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::source::{ExpertWeights, Mat};
    use mfx_formats::mxfp4::quantize_mxfp4;
    use mfx_runtime::weights::Matrix;

    fn mat(rows: usize, cols: usize, seed: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|i| (((i + seed) * 7919 % 211) as f32 / 105.0 - 1.0) * 0.1)
                .collect(),
        }
    }

    /// MXFP4 source parts go into the pack byte for byte whatever the bit
    /// width asked for; the others are quantized as before.
    #[test]
    fn mxfp4_sources_are_stored_as_they_are() {
        let (hidden, inter) = (64, 32);
        let gate_q = quantize_mxfp4(&mat(inter, hidden, 1).data, inter, hidden).unwrap();
        let down_q = quantize_mxfp4(&mat(hidden, inter, 3).data, hidden, inter).unwrap();
        let gate_m = Matrix::from_mxfp4(&gate_q).unwrap();
        let down_m = Matrix::from_mxfp4(&down_q).unwrap();
        let ew = ExpertWeights {
            gate: Mat::of(&gate_m),
            up: mat(inter, hidden, 2),
            down: Mat::of(&down_m),
            mxfp4: [Some(gate_m), None, Some(down_m)],
            bias: None,
        };
        let out = encode_expert(&ew, 2, 32, 0.0, 0, 0, None).unwrap();
        let [(gs, gshape, g), (us, _, _), (ds, dshape, d)] = &out.parts;
        assert_eq!((*gs, gshape.as_slice()), (Scheme::Mxfp4, &[32u64, 64][..]));
        assert_eq!((*ds, dshape.as_slice()), (Scheme::Mxfp4, &[64u64, 32][..]));
        assert_eq!(*us, Scheme::affine(2, 32).unwrap());
        assert_eq!(g.parts(), vec![&gate_q.blocks[..], &gate_q.scales[..]]);
        assert_eq!(d.parts(), vec![&down_q.blocks[..], &down_q.scales[..]]);
    }
}
