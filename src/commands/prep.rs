//! `mfx prep MODEL --ram 32G -o model.mfx`: turn a checkpoint into packs
//! tuned for a machine's memory. All logic lives in `mfx_prep`; this module
//! maps flags to `mfx_prep::Options` and prints the summary.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
pub struct Args {
    /// Checkpoint directory (Hugging Face or MLX), or a hub id ORG/NAME already
    /// in the local Hugging Face cache.
    pub model: String,
    /// Memory budget(s): 16G, 32GB, 48GiB, 512M (binary units), or a list
    /// 16G,32G,64G (one pack per budget, one profiling run).
    #[arg(long)]
    pub ram: String,
    /// Output pack; with several budgets a pattern containing {ram}.
    #[arg(short, long)]
    pub output: String,
    /// Calibration text files (documents separated by "\n<|endoftext|>\n");
    /// default: the built-in set (code in five languages, prose, chat).
    #[arg(long, num_args = 1..)]
    pub calib: Vec<PathBuf>,
    /// Calibration as token-id files (whitespace- or comma-separated ids),
    /// used as given: for checkpoints without a tokenizer.json.
    #[arg(long, num_args = 1.., conflicts_with = "calib")]
    pub calib_ids: Vec<PathBuf>,
    /// What the pack is for, which weights the built-in calibration mix:
    /// `general` (every source alike), `coding` (code and agent chat, little
    /// prose) or `chat` (conversation and prose, little code). Ignored with
    /// --calib/--calib-ids.
    #[arg(long, default_value = "general", value_name = "TASK")]
    pub task: mfx_prep::calib::Task,
    /// Rows of --calib-seq tokens taken from each calibration source.
    #[arg(long, default_value_t = 16)]
    pub calib_rows: usize,
    /// Tokens per calibration row (each row is an independent sequence).
    #[arg(long, default_value_t = 512)]
    pub calib_seq: usize,
    /// Reuse a routing/pin profile (skips profiling).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Write the routing/pin profile to FILE.
    #[arg(long)]
    pub save_profile: Option<PathBuf>,
    /// Pin experts per layer until they carry this share of routing mass.
    #[arg(long, default_value_t = 0.8)]
    pub pin_mass: f64,
    /// Bits of frequently routed ("hot") experts.
    #[arg(long, default_value_t = 4)]
    pub hot_bits: u8,
    /// Bits of rarely routed ("cold") experts.
    #[arg(long, default_value_t = 2)]
    pub cold_bits: u8,
    /// Bits of dense weights (attention, embeddings, lm_head): 8 or 4. Routers stay at 8.
    #[arg(long, default_value_t = 8)]
    pub dense_bits: u8,
    /// Quantization group size (32, 64 or 128).
    #[arg(long, default_value_t = 64)]
    pub group_size: u32,
    /// Fraction of each layer's experts at --hot-bits (overrides the automatic choice).
    #[arg(long)]
    pub hot_fraction: Option<f64>,
    /// Merge experts that compute nearly the same function (outputs compared
    /// on calibration inputs, hidden units aligned before averaging):
    /// `--merge` alone merges as much as --merge-max-nll allows; `--merge
    /// 0.1` merges a tenth of each MoE layer's experts, or nothing if that
    /// exceeds --merge-max-nll.
    #[arg(long, value_name = "FRACTION", num_args = 0..=1, default_missing_value = "auto")]
    pub merge: Option<mfx_prep::merge::MergeMode>,
    /// Largest relative NLL increase a merge may cause (0.02 = +2%).
    #[arg(long, default_value_t = 0.02)]
    pub merge_max_nll: f64,
    /// Remove this share of each MoE layer's experts (0.25: a quarter),
    /// those with the lowest saliency over the calibration set (router
    /// weight times output norm over the tokens routed to them, see
    /// --prune-by), router rows included; never fewer than top-k remain.
    #[arg(long, default_value_t = 0.0)]
    pub prune: f64,
    /// How --prune (and --merge's ranking) scores experts: `total` (summed
    /// over the calibration tokens: how much the text leans on the expert)
    /// or `mean` (REAP's mean over the tokens routed to it).
    #[arg(long, default_value = "total", value_name = "KIND")]
    pub prune_by: mfx_prep::prune::SaliencyKind,
    /// Choose routed experts' codes below 8 bits with GPTQ: a second pass
    /// over the calibration batch collects each expert's input and
    /// intermediate-activation statistics, and each row's rounding error is
    /// spread over its not-yet-quantized columns to minimise the error of
    /// the expert's outputs (not of its weights). Same pack format; slower.
    #[arg(long)]
    pub gptq: bool,
    /// Align every blob in the pack to this many bytes (a power of two from
    /// 4096 to 1048576). The default, 16384, is Apple Silicon's page; 4096
    /// stores small experts (a few KiB at 2-3 bits) without padding each to
    /// 16 KiB. Expert reads are 4 KiB-aligned either way.
    #[arg(long, default_value_t = mfx_formats::pack::DEFAULT_ALIGNMENT)]
    pub align: u32,
    /// Store an expert blob coded (zstd/Huffman) only if it saves at least this fraction.
    #[arg(long, default_value_t = mfx_prep::entropy::DEFAULT_MIN_SAVING)]
    pub min_codec_saving: f64,
    /// Write the full JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Measure each pack's NLL on these texts (../shared's val protocol) and
    /// put the numbers in the report and model card.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Rows of --calib-seq tokens scored per --eval-data file.
    #[arg(long, default_value_t = 64)]
    pub eval_rows: usize,
    /// Do not write the model card (README.md) beside the pack.
    #[arg(long)]
    pub no_card: bool,
    /// Hide progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    remove_temp_files_on_signal()?;
    let rams = mfx_prep::ram::parse_list(&a.ram)?;
    let opts = mfx_prep::Options {
        model: a.model,
        rams,
        output: a.output,
        calib: a.calib,
        calib_ids: a.calib_ids,
        calib_rows: a.calib_rows,
        task: a.task,
        calib_seq: a.calib_seq,
        profile: a.profile,
        save_profile: a.save_profile,
        pin_mass: a.pin_mass,
        hot_bits: a.hot_bits,
        cold_bits: a.cold_bits,
        dense_bits: a.dense_bits,
        group_size: a.group_size,
        hot_fraction: a.hot_fraction,
        merge: a.merge,
        merge_max_nll: a.merge_max_nll,
        prune: a.prune,
        prune_by: a.prune_by,
        gptq: a.gptq,
        align: a.align,
        min_codec_saving: a.min_codec_saving,
        report: a.report,
        eval_data: a.eval_data,
        eval_rows: a.eval_rows,
        model_card: !a.no_card,
        progress: !a.quiet,
    };
    let quiet = a.quiet;
    let log = move |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    let out = mfx_prep::run(&opts, &log).context("mfx prep failed")?;
    for p in &out.packs {
        let c = p.codecs.experts;
        println!(
            "{}: {} bytes, {:.2} bits/weight, hot {:.0}%, pinned {}/{} ({:.0}% of routing), predicted hit rate {:.1}%, \
             expert blobs zstd -{:.1}% huffman -{:.1}% (stored: {} none, {} zstd, {} huffman)",
            p.path,
            p.file_bytes,
            p.bits_per_weight,
            p.hot_fraction * 100.0,
            p.pinned_experts,
            p.total_experts,
            p.pinned_token_share * 100.0,
            p.predicted_hit_rate * 100.0,
            pct(c.raw, c.zstd),
            pct(c.raw, c.huffman),
            p.codecs.stored_none,
            p.codecs.stored_zstd,
            p.codecs.stored_huffman
        );
    }
    Ok(())
}

/// Ctrl-C or SIGTERM during prep: remove the half-written pack (and any
/// other temp file being written), then exit as the signal would have, with
/// status 128 + its number. Without this the process died without
/// unwinding and left `OUT.mfx.tmp-PID` behind (issue 16).
fn remove_temp_files_on_signal() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT/SIGTERM handler")?;
    std::thread::Builder::new()
        .name("mfx-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let removed = mfx_formats::tempfiles::remove_all();
                let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "\ninterrupted: removed {} unfinished file(s){}{}",
                    names.len(),
                    if names.is_empty() { "" } else { ": " },
                    names.join(", ")
                );
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn pct(raw: u64, coded: u64) -> f64 {
    if raw == 0 {
        0.0
    } else {
        (1.0 - coded as f64 / raw as f64) * 100.0
    }
}
