//! The model's tokenizer as llguidance sees it, compiled grammars, and the
//! per-generation token mask.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokTrie};
use llguidance::{Matcher, ParserFactory};
use toktrie_hf_tokenizers::{ByteTokenizer, ByteTokenizerEnv};

use super::ConstrainError;
use crate::generate::TokenConstraint;

/// A tokenizer turned into llguidance's token trie, and the parser factory
/// over it. Built once per model (a 150k vocabulary takes a noticeable
/// fraction of a second); compiling a grammar against it is cheap.
pub struct GrammarEnv {
    factory: ParserFactory,
}

impl GrammarEnv {
    /// `eos`: the ids that end a reply (the generator's); `vocab`: the
    /// model's logits width, which may exceed the tokenizer's vocabulary.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        eos: &[u32],
        vocab: usize,
    ) -> Result<Self, ConstrainError> {
        let bad = |e: String| ConstrainError::Tokenizer(e);
        // toktrie_hf_tokenizers asserts on tokenizers it does not expect;
        // a panic there must become an error, not take the server down.
        let bt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ByteTokenizer::from_tokenizer(tokenizer.clone())
        }))
        .map_err(|_| bad("the token table could not be read".into()))?
        .map_err(|e| bad(e.to_string()))?;
        let mut words = bt.token_bytes();
        // ByteTokenizer treats every added `<…>` token as special (reachable
        // only through `<name>` in a grammar). An added token the tokenizer
        // does not call special (Qwen's `<tool_call>`, `</think>`) is text
        // the model writes: keep it as its bytes, so that a grammar's
        // "<tool_call>" literal allows the single token the model writes.
        for (id, t) in tokenizer.get_added_tokens_decoder() {
            if !t.special {
                if let Some(w) = words.get_mut(id as usize) {
                    *w = t.content.into_bytes();
                }
            }
        }
        if vocab < words.len() {
            return Err(bad(format!(
                "the model's vocabulary ({vocab}) is smaller than its tokenizer's ({})",
                words.len()
            )));
        }
        // Ids past the tokenizer's table (padding rows of the embedding)
        // are special tokens no grammar names, so never allowed.
        while words.len() < vocab {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let mut info = bt.tokrx_info();
        info.vocab_size = vocab as u32;
        let eos: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&e| (e as usize) < vocab)
            .collect();
        if let Some(&first) = eos.first() {
            info.tok_eos = first;
        }
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = ByteTokenizerEnv {
            tokenizer: bt,
            tok_trie: trie,
        }
        .to_env();
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        // Errors come back as values; nothing on stderr.
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// Compiles a Lark grammar (see [`super::grammar`]) and advances it past
    /// `prefix`, text the server already wrote at the start of the reply
    /// (a forced tool call's opening), which the grammar must allow.
    pub fn compile(&self, lark: &str, prefix: &str) -> Result<Grammar, ConstrainError> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(lark.to_owned()));
        let mut matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(ConstrainError::Grammar(e));
        }
        if !prefix.is_empty() {
            let ids = self.factory.tok_env().tokenize(prefix);
            matcher.consume_tokens(&ids).map_err(|e| {
                ConstrainError::Parser(format!("the reply's forced opening {prefix:?}: {e}"))
            })?;
        }
        Ok(Grammar {
            source: Arc::from(lark),
            prefix: Arc::from(prefix),
            matcher: Arc::new(Mutex::new(matcher)),
        })
    }

    /// The token ids of `text` as the trie's tokenizer splits it.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.factory.tok_env().tokenize(text)
    }
}

/// A compiled grammar, ready to constrain any number of generations.
#[derive(Clone)]
pub struct Grammar {
    source: Arc<str>,
    prefix: Arc<str>,
    /// The parser at the start of the reply; each generation takes a clone.
    matcher: Arc<Mutex<Matcher>>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("source", &self.source)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.prefix == other.prefix
    }
}

impl Grammar {
    /// The Lark text it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A mask for one generation, at the start of the reply.
    pub fn mask(&self) -> TokenMask {
        let matcher = match self.matcher.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TokenMask {
            matcher,
            mask_time: Duration::ZERO,
            steps: 0,
        }
    }
}

/// One generation's grammar state.
pub struct TokenMask {
    matcher: Matcher,
    mask_time: Duration,
    steps: usize,
}

impl TokenMask {
    /// Time spent computing masks, and how many were computed.
    pub fn cost(&self) -> (Duration, usize) {
        (self.mask_time, self.steps)
    }

    /// True once the grammar is complete and only end-of-sequence remains.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the text spelled by `ids` would be allowed next, token by
    /// token (tests and diagnostics; it advances the state).
    pub fn accepts(&mut self, ids: &[u32]) -> bool {
        for &id in ids {
            match self.matcher.compute_mask() {
                Ok(m) if m.is_allowed(id) => {}
                _ => return false,
            }
            if self.matcher.consume_token(id).is_err() {
                return false;
            }
        }
        true
    }

    /// Whether an end-of-sequence token is allowed now.
    pub fn allows_eos(&mut self, eos: u32) -> bool {
        self.matcher
            .compute_mask_or_eos()
            .is_ok_and(|m| m.is_allowed(eos))
    }
}

impl TokenConstraint for TokenMask {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let t = Instant::now();
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        // One bit per token, 32 to a word; a zero bit is a banned token.
        for (w, chunk) in allowed.as_slice().iter().zip(logits.chunks_mut(32)) {
            if *w == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if w & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let words = allowed.as_slice().len();
        for l in logits.iter_mut().skip(words * 32) {
            *l = f32::NEG_INFINITY;
        }
        self.mask_time += t.elapsed();
        self.steps += 1;
        Ok(())
    }

    fn commit(&mut self, id: u32) -> Result<(), String> {
        self.matcher.consume_token(id).map_err(|e| e.to_string())
    }
}
