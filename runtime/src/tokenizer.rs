//! Text <-> token ids through Hugging Face's `tokenizers` crate.
//!
//! We never re-implement a tokenizer: `tokenizer.json` fully describes the
//! normalizer, pre-tokenizer, model, post-processor and decoder, and the
//! crate runs it exactly as transformers does. A model directory carries the
//! file; a pack embeds its bytes, hence [`Tokenizer::from_bytes`].
//!
//! Streaming output needs care: one token can hold half of a UTF-8 character
//! (byte-level BPE) or its text can depend on its neighbours (SentencePiece's
//! leading-space handling), so [`StreamDecoder`] decodes a short window of
//! recent ids and only releases text once it no longer ends in a partial
//! character.

use std::path::{Path, PathBuf};

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer.json ({origin}): {message}")]
    Parse { origin: String, message: String },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A loaded tokenizer. Cheap to share behind an `Arc`; `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes_named(&bytes, &path.display().to_string())
    }

    /// Parses the bytes of a `tokenizer.json` (as embedded in a pack).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        Self::from_bytes_named(bytes, "embedded tokenizer.json")
    }

    fn from_bytes_named(bytes: &[u8], origin: &str) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Parse {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Self { inner })
    }

    /// Encodes `text`. Added tokens such as `<|im_start|>` are always
    /// recognised as single ids. `add_special_tokens` runs the tokenizer's
    /// post-processor (which adds a BOS for Llama-style tokenizers and nothing
    /// for Qwen's): pass `true` for raw prompts, as `tokenizer(text)` does in
    /// transformers, and `false` for text rendered by a chat template, which
    /// already spells out any BOS (as `apply_chat_template` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; `skip_special_tokens` drops added special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The vocabulary entry of one id (e.g. `Ġthe` for byte-level BPE), not
    /// its decoded text; `None` for an id outside the vocabulary.
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry or added token, e.g. `<|im_end|>`.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object, for callers that need more.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer that never splits a UTF-8 character.
///
/// Same algorithm as text-generation-inference and `tokenizers`'
/// `DecodeStream`: decode `ids[prefix_start..]`, compare with the text of
/// `ids[prefix_start..read_start]`, and release the difference unless it ends
/// in U+FFFD (an incomplete byte sequence). Decoding a window rather than
/// single tokens keeps decoders that look at neighbours (SentencePiece's
/// `▁` stripping) right. Unlike `DecodeStream` it owns no borrow of the
/// tokenizer, so it can live in a struct next to it or move across threads.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context.
    prefix_start: usize,
    /// Ids before this index have had their text released.
    read_start: usize,
    skip_special_tokens: bool,
}

impl StreamDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds one id and returns the text it completes (possibly empty, when
    /// the id ends inside a multi-byte character).
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_start..self.read_start],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&self.ids[self.prefix_start..], self.skip_special_tokens)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_start = self.read_start;
            self.read_start = self.ids.len();
            // Keep the window short: the ids before prefix_start never
            // influence later text for any decoder `tokenizers` ships.
            if self.prefix_start > 64 {
                self.ids.drain(..self.prefix_start);
                self.read_start -= self.prefix_start;
                self.prefix_start = 0;
            }
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Releases whatever is still held back (an incomplete character at the
    /// very end becomes U+FFFD, as `decode` would render it).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(
            &self.ids[self.prefix_start..self.read_start],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&self.ids[self.prefix_start..], self.skip_special_tokens)?;
        self.prefix_start = self.read_start;
        self.read_start = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(full[prefix.len()..].to_owned())
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_model(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models")
            .join(name)
    }

    fn reference() -> serde_json::Value {
        let p = shared_model("tiny-qwen3-moe-coder/reference/reference.json");
        let text = std::fs::read_to_string(&p).expect("read reference.json");
        serde_json::from_str(&text).expect("parse reference.json")
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    #[test]
    fn encodes_reference_prompts_like_transformers() {
        let tok = Tokenizer::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("load");
        let r = reference();
        for (name, p) in r["prompts"].as_object().expect("prompts") {
            let text = p["text"].as_str().expect("text");
            assert_eq!(
                tok.encode(text, true).expect("encode"),
                ids(&p["ids"]),
                "prompt {name}"
            );
            assert_eq!(
                tok.decode(&ids(&p["greedy_48"]), false).expect("decode"),
                p["greedy_text"].as_str().expect("t")
            );
        }
    }

    #[test]
    fn special_tokens_are_single_ids_and_no_bos_is_added() {
        let tok = Tokenizer::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("load");
        let ids = tok
            .encode("<|im_start|>user\nhi<|im_end|>", true)
            .expect("encode");
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().expect("non-empty"), 2);
        assert_eq!(tok.piece_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.id_to_piece(2).as_deref(), Some("<|im_end|>"));
        assert_eq!(tok.id_to_piece(1 << 30), None);
    }

    #[test]
    fn from_bytes_matches_from_file_and_bad_bytes_error() {
        let dir = shared_model("tiny-qwen3-moe-coder");
        let bytes = std::fs::read(dir.join("tokenizer.json")).expect("read");
        let a = Tokenizer::from_bytes(&bytes).expect("bytes");
        let b = Tokenizer::from_model_dir(&dir).expect("dir");
        assert_eq!(
            a.encode("fn main() {}", true).expect("a"),
            b.encode("fn main() {}", true).expect("b")
        );
        let err = Tokenizer::from_bytes(b"{not json").expect_err("must fail");
        assert!(err.to_string().contains("embedded tokenizer.json"), "{err}");
        let err = Tokenizer::from_model_dir(Path::new("/nonexistent-dir")).expect_err("must fail");
        assert!(
            err.to_string().contains("/nonexistent-dir/tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn stream_decoder_never_splits_characters_and_equals_full_decode() {
        let tok = Tokenizer::from_model_dir(&shared_model("tiny-qwen3-moe-coder")).expect("load");
        // Multi-byte characters split across byte-level tokens.
        let text = "naïve café — 日本語 🦀 crab\n\tdone ✓";
        let ids = tok.encode(text, false).expect("encode");
        assert!(ids.len() > 10);
        let mut dec = StreamDecoder::new(false);
        let mut out = String::new();
        let mut saw_held_back = false;
        for &id in &ids {
            let d = dec.step(&tok, id).expect("step");
            assert!(
                !d.contains('\u{FFFD}'),
                "delta {d:?} contains a replacement char"
            );
            saw_held_back |= d.is_empty();
            out.push_str(&d);
        }
        out.push_str(&dec.finish(&tok).expect("finish"));
        assert_eq!(out, text);
        assert!(
            saw_held_back,
            "expected at least one token that ends inside a character"
        );
        // Also a long stream, to exercise the window trimming.
        let long: String = (0..200).map(|i| format!("é{i} ")).collect();
        let ids = tok.encode(&long, false).expect("encode");
        let mut dec = StreamDecoder::new(false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&dec.step(&tok, id).expect("step"));
        }
        out.push_str(&dec.finish(&tok).expect("finish"));
        assert_eq!(out, long);
    }
}
