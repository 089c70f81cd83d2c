//! Calibration text -> token rows.
//!
//! Protocol (the one ../shared's reference uses for `val_nll` and
//! `routing_counts_val`, so profiles are comparable with it): split the text
//! on `\n<|endoftext|>\n`, drop empty pieces, encode each piece (no BOS,
//! special tokens parsed), append the end-of-text token after each,
//! concatenate, and cut the first `rows * seq` tokens into rows of `seq`.
//! Every row is an independent sequence (position 0 at its start).

use crate::error::{PrepError, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Document separator in calibration and validation files.
pub const DOC_SEP: &str = "\n<|endoftext|>\n";

/// The built-in calibration set (profiles/calibration/, sources in SOURCES.md):
/// code in several languages, prose and ChatML chat.
pub const BUILTIN: [(&str, &str); 7] = [
    (
        "builtin:python",
        include_str!("../../profiles/calibration/python.txt"),
    ),
    (
        "builtin:rust",
        include_str!("../../profiles/calibration/rust.txt"),
    ),
    (
        "builtin:c",
        include_str!("../../profiles/calibration/c.txt"),
    ),
    (
        "builtin:javascript",
        include_str!("../../profiles/calibration/javascript.txt"),
    ),
    (
        "builtin:go",
        include_str!("../../profiles/calibration/go.txt"),
    ),
    (
        "builtin:prose",
        include_str!("../../profiles/calibration/prose.txt"),
    ),
    (
        "builtin:chat",
        include_str!("../../profiles/calibration/chat.txt"),
    ),
];

/// One named calibration text.
pub struct CalibText {
    pub name: String,
    pub text: String,
    /// Rows taken from it, as a multiple of `--calib-rows` (the task mix).
    pub weight: f64,
}

/// What the pack will mostly be used for: the built-in calibration mix
/// (`--task`). Routing, pins, the hot/cold choice, pruning and GPTQ all
/// follow the calibration text, so a coding agent's pack should be
/// calibrated on code and agent chat, a chat assistant's on conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Every built-in source at `--calib-rows` rows.
    #[default]
    General,
    /// Code in every language at full weight, chat (agents speak it) at
    /// full weight, prose at a quarter.
    Coding,
    /// Chat and prose at twice `--calib-rows`, code at a quarter.
    Chat,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "general" => Ok(Task::General),
            "coding" => Ok(Task::Coding),
            "chat" => Ok(Task::Chat),
            _ => Err(format!("expected general, coding or chat, got `{s}`")),
        }
    }
}

impl Task {
    /// Rows of built-in source `name`, as a multiple of `--calib-rows`.
    pub fn weight(self, name: &str) -> f64 {
        let code = !matches!(name, "builtin:prose" | "builtin:chat");
        match (self, code, name) {
            (Task::General, _, _) => 1.0,
            (Task::Coding, true, _) | (Task::Coding, _, "builtin:chat") => 1.0,
            (Task::Coding, _, _) => 0.25,
            (Task::Chat, false, _) => 2.0,
            (Task::Chat, true, _) => 0.25,
        }
    }
}

/// The built-in calibration set weighted for `task`.
pub fn builtin_texts(task: Task) -> Vec<CalibText> {
    BUILTIN
        .iter()
        .map(|(n, t)| CalibText {
            name: n.to_string(),
            text: t.to_string(),
            weight: task.weight(n),
        })
        .collect()
}

pub fn read_texts(paths: &[PathBuf]) -> Result<Vec<CalibText>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| {
                PrepError::Calibration(format!(
                    "cannot read --calib file {} as UTF-8 text: {e}",
                    p.display()
                ))
            })?;
            Ok(CalibText {
                name: p.display().to_string(),
                text,
                weight: 1.0,
            })
        })
        .collect()
}

pub struct Tok {
    inner: Tokenizer,
    pub eos: u32,
}

impl Tok {
    /// Loads `tokenizer.json` from the model directory; the end-of-text id is
    /// `<|endoftext|>` if the vocabulary has it, else config's `eos_token_id`.
    pub fn load(model_dir: &Path, config_eos: Option<u32>) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path).map_err(|e| PrepError::Tokenizer {
            path: path.clone(),
            msg: format!(
                "cannot load ({e}); prep needs tokenizer.json to tokenize calibration text"
            ),
        })?;
        let eos = inner
            .token_to_id("<|endoftext|>")
            .or(config_eos)
            .ok_or_else(|| PrepError::Tokenizer {
                path: path.clone(),
                msg: "no <|endoftext|> token and no eos_token_id in config.json".into(),
            })?;
        Ok(Self { inner, eos })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| PrepError::Calibration(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The protocol above; returns up to `max_rows` full rows of `seq` tokens.
    pub fn rows(&self, name: &str, text: &str, max_rows: usize, seq: usize) -> Result<Vec<u32>> {
        let want = max_rows * seq;
        let mut ids = Vec::new();
        for piece in text.split(DOC_SEP).filter(|p| !p.is_empty()) {
            ids.extend(self.encode(piece)?);
            ids.push(self.eos);
            if ids.len() >= want {
                break;
            }
        }
        let rows = (ids.len() / seq).min(max_rows);
        if rows == 0 {
            return Err(PrepError::Calibration(format!(
                "{name} has only {} tokens; a calibration source needs at least one row of {seq} (--calib-seq)",
                ids.len()
            )));
        }
        ids.truncate(rows * seq);
        Ok(ids)
    }
}
