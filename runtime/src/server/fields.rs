//! The sampler fields OpenAI's chat completions, completions and Responses
//! requests share, read and checked in one place.
//!
//! They are parsed from the request body apart from the endpoint's own
//! struct rather than `#[serde(flatten)]`ed into it: serde hands a
//! flattened struct buffered content, so a type error inside it loses its
//! path, and `"presence_penalty": "x"` must be a 400 naming
//! `presence_penalty`. Each struct ignores the other's fields.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::backend::Penalties;
use super::constraint::ResponseFormat;
use super::error::{parse_body, ApiError, Flavor};
use super::pipeline::SamplingRequest;

const F: Flavor = Flavor::OpenAi;

/// Most alternatives per token (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

/// Every field that decides how tokens are picked, as the OpenAI wire
/// spells it; `repetition_penalty`, `min_p`, `top_k` and `ignore_eos` are
/// vLLM's extensions.
#[derive(Deserialize, Default)]
pub struct SamplerFields {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Do not stop at end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// See `backend::Penalties`.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Token id (as a string) to bias.
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Chat: `true`/`false`; completions: how many alternatives (0..=20).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Chat only: alternatives per token, with `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// `text`, `json_object` or `json_schema` (see `constraint::ResponseFormat`).
    #[serde(default)]
    pub response_format: Option<Value>,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(F, msg).param(param)
}

impl SamplerFields {
    /// Reads the fields from a request body (unknown fields ignored).
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        parse_body(F, body)
    }

    /// The sampling request; `max_tokens` is the endpoint's own field and
    /// `logprobs` what [`Self::chat_logprobs`] or
    /// [`Self::completion_logprobs`] resolved.
    pub fn into_request(
        self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
    ) -> Result<SamplingRequest, ApiError> {
        let response_format =
            ResponseFormat::parse(self.response_format.as_ref(), F, "response_format")?;
        let penalties = self.penalties()?;
        Ok(SamplingRequest {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed.map(|s| s as u64),
            max_tokens,
            stop: self.stop.map(StopSpec::into_vec).unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            penalties,
            logprobs,
            response_format,
        })
    }

    /// Chat's `logprobs` (a boolean) and `top_logprobs`: `Some(k)` when
    /// log-probabilities with `k` alternatives are asked for.
    pub fn chat_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let on = match &self.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(bad(
                    "logprobs",
                    format!("logprobs: expected true or false, got {other}"),
                ))
            }
        };
        let top = self.top_logprobs.unwrap_or(0);
        if top > MAX_TOP_LOGPROBS {
            return Err(bad(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}"),
            ));
        }
        if top > 0 && !on {
            return Err(bad("top_logprobs", "top_logprobs needs `logprobs: true`"));
        }
        Ok(on.then_some(top as usize))
    }

    /// Completions' `logprobs`: an integer, the alternatives per token.
    pub fn completion_logprobs(&self) -> Result<Option<usize>, ApiError> {
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(bad(
                "top_logprobs",
                "top_logprobs is a chat field; /v1/completions takes `logprobs: N`",
            ));
        }
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(k) if k <= u64::from(MAX_TOP_LOGPROBS) => Ok(Some(k as usize)),
                _ => Err(bad(
                    "logprobs",
                    format!(
                        "logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {n}"
                    ),
                )),
            },
            Some(other) => Err(bad(
                "logprobs",
                format!(
                    "logprobs: expected an integer between 0 and {MAX_TOP_LOGPROBS}, got {other}"
                ),
            )),
        }
    }

    /// Refuses the chat-only output fields where an endpoint has none
    /// (`/v1/responses` spells them `text.format` and `top_logprobs`).
    pub fn refuse_for_responses(&self) -> Result<(), ApiError> {
        if self.response_format.is_some() {
            return Err(bad(
                "response_format",
                "response_format is a chat completions field; /v1/responses takes `text.format`",
            ));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad(
                "logprobs",
                "logprobs is not supported on /v1/responses",
            ));
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(bad(
                "top_logprobs",
                "top_logprobs is not supported on /v1/responses",
            ));
        }
        Ok(())
    }

    /// The penalties, with `logit_bias` keys read as token ids (ranges are
    /// checked with the other sampling fields in `pipeline`).
    fn penalties(&self) -> Result<Penalties, ApiError> {
        let mut bias = Vec::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let id = k.trim().parse::<u32>().map_err(|_| {
                bad(
                    "logit_bias",
                    format!("logit_bias: keys are token ids (integers as strings), got {k:?}"),
                )
            })?;
            bias.push((id, *v));
        }
        bias.sort_by_key(|(id, _)| *id);
        Ok(Penalties {
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            min_p: self.min_p,
            logit_bias: bias,
        })
    }
}
