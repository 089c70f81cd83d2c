//! Constrained decoding: a request's required output shape (a JSON object,
//! a JSON schema, tool calls in the model's own syntax) as an llguidance
//! grammar, and the per-token mask that holds the sampler to it.
//!
//! [`grammar`] writes the grammar text (pure: request in, Lark out);
//! [`GrammarEnv`] turns the model's tokenizer into llguidance's token trie
//! once and compiles grammars against it; a compiled [`Grammar`] gives each
//! generation a fresh [`TokenMask`], which `Generator::generate_constrained`
//! asks for the allowed tokens before every sampling step and tells the
//! sampled token after it. The grammar ends where the reply ends: once it is
//! complete only end-of-sequence tokens are allowed.

mod env;
pub mod grammar;
#[cfg(test)]
mod tests;

pub use env::{Grammar, GrammarEnv, TokenMask};

/// Why a constraint could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    /// The request asks for something the grammar cannot express (a tool-call
    /// format without a grammar, a schema feature llguidance refuses).
    #[error("{0}")]
    Unsupported(String),
    /// llguidance refused the grammar or schema; the message is its own.
    #[error("{0}")]
    Grammar(String),
    /// The tokenizer could not be turned into a token trie.
    #[error("constrained decoding is not available for this tokenizer: {0}")]
    Tokenizer(String),
    /// The parser failed mid-generation (a bug, not the client's fault).
    #[error("grammar parser: {0}")]
    Parser(String),
}
