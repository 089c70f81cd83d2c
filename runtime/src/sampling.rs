//! Picking the next token from logits.
//!
//! The filters run in Hugging Face's order -- repetition penalty, then
//! temperature, then top-k, top-p, min-p -- so that a `generation_config.json`
//! tuned for transformers means the same thing here. OpenAI's request
//! fields come first: `logit_bias` is added to the raw logits, and the
//! presence/frequency penalties are subtracted after the repetition penalty,
//! counting only the completion's tokens (OpenAI's definition). Temperature 0 is greedy
//! (argmax, ties to the lowest id, like `torch.argmax`/`np.argmax`), which
//! makes greedy output comparable token for token with reference runs.
//!
//! Randomness comes from a ChaCha RNG seeded explicitly, so a seed reproduces
//! a completion exactly on every platform; without a seed the sampler seeds
//! itself from the OS.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to choose tokens. `Default` is greedy with no filters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to
    /// at least `p`; `>= 1` disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's;
    /// 0 disables.
    pub min_p: f32,
    /// HF/CTRL repetition penalty: a seen token's positive logit is divided
    /// by it, a negative one multiplied; 1 disables.
    pub repetition_penalty: f32,
    /// How many of the most recent tokens (prompt included) the penalty
    /// looks at; 0 means all of them, as transformers does.
    pub repetition_last_n: usize,
    /// OpenAI's presence penalty: subtracted once from the logit of every
    /// token the completion already holds; 0 disables.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once
    /// per time the completion holds it; 0 disables.
    pub frequency_penalty: f32,
    /// Added to the raw logits of these token ids (OpenAI's `logit_bias`;
    /// -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_last_n: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalty.
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    /// Rejects values that have no meaning (NaN, negative top-p...), naming
    /// the field, so that an API caller gets a clear 400 instead of odd text.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |field: &'static str, value: f32, expected: &'static str| {
            Err(SamplingError::InvalidParam {
                field,
                value: value.to_string(),
                expected,
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p.is_finite()) {
            return bad("top_p", self.top_p, "a number in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                self.presence_penalty,
                "a number in [-2, 2]",
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                self.frequency_penalty,
                "a number in [-2, 2]",
            );
        }
        if let Some(&(_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", b, "biases in [-100, 100]");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("invalid sampling parameter {field} = {value}: expected {expected}")]
    InvalidParam {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the model produced no finite logit (all {0} are NaN or -inf)")]
    NoFiniteLogits(usize),
    #[error("logit_bias: token id {id} is not in the vocabulary ({vocab} tokens)")]
    BiasOutOfVocab { id: u32, vocab: usize },
}

/// A stateful sampler: the parameters plus the RNG stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch (id, value) pairs reused across steps to avoid reallocating a
    /// vocabulary-sized buffer per token.
    scratch: Vec<(u32, f32)>,
    /// Length of the history at the first call: the prompt. The OpenAI
    /// penalties count only what comes after it.
    prompt_len: Option<usize>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_entropy(),
        };
        Ok(Self {
            params,
            rng,
            scratch: Vec::new(),
            prompt_len: None,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is modified in place (penalised and
    /// scaled); `history` is every token so far, prompt included.
    /// The first call's `history` is taken to be the prompt.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32, SamplingError> {
        let prompt_len = *self.prompt_len.get_or_insert(history.len());
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            let vocab = logits.len();
            let v = logits
                .get_mut(id as usize)
                .ok_or(SamplingError::BiasOutOfVocab { id, vocab })?;
            *v += bias;
        }
        if p.repetition_penalty != 1.0 {
            let start = if p.repetition_last_n == 0 {
                0
            } else {
                history.len().saturating_sub(p.repetition_last_n)
            };
            apply_repetition_penalty(logits, &history[start..], p.repetition_penalty);
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let completion = &history[prompt_len.min(history.len())..];
            apply_openai_penalties(logits, completion, p.presence_penalty, p.frequency_penalty);
        }
        if p.is_greedy() {
            return argmax(logits).ok_or(SamplingError::NoFiniteLogits(logits.len()));
        }
        let inv_t = 1.0 / p.temperature;
        // Candidates: finite logits, scaled by temperature.
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as u32, v * inv_t)),
        );
        let c = &mut self.scratch;
        if c.is_empty() {
            return Err(SamplingError::NoFiniteLogits(logits.len()));
        }
        let by_value_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_value_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_value_desc);
        // Softmax over the survivors (stable: subtract the max).
        let max = c[0].1;
        let mut sum = 0.0f64;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1 as f64;
        }
        for e in c.iter_mut() {
            e.1 = (e.1 as f64 / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += e.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|e| e.1 >= floor).count();
            c.truncate(keep.max(1));
        }
        let total: f32 = c.iter().map(|e| e.1).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for e in c.iter() {
            r -= e.1;
            if r < 0.0 {
                return Ok(e.0);
            }
        }
        // Rounding left a sliver: the last survivor takes it.
        Ok(c[c.len() - 1].0)
    }
}

/// Index of the largest finite logit, ties to the lowest index; `None` if
/// no logit is finite.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || v == f32::NEG_INFINITY {
            continue;
        }
        let better = match best {
            None => true,
            Some((_, b)) => v > b,
        };
        if better {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token seen
/// is penalised once, whatever its count.
fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = std::collections::HashSet::with_capacity(seen.len());
    for &t in seen {
        let Some(v) = logits.get_mut(t as usize) else {
            continue;
        };
        if done.insert(t) {
            *v = if *v < 0.0 { *v * penalty } else { *v / penalty };
        }
    }
}

/// OpenAI's `logits[j] -= c[j] * frequency + (c[j] > 0) * presence`, with
/// `c[j]` the count of token `j` in the completion so far.
fn apply_openai_penalties(logits: &mut [f32], completion: &[u32], presence: f32, frequency: f32) {
    let mut counts = std::collections::HashMap::with_capacity(completion.len());
    for &t in completion {
        *counts.entry(t).or_insert(0u32) += 1;
    }
    for (t, c) in counts {
        if let Some(v) = logits.get_mut(t as usize) {
            *v -= c as f32 * frequency + presence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).expect("valid params")
    }

    fn histogram(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = sampler(p);
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            let mut l = logits.to_vec();
            h[s.sample(&mut l, &[]).expect("sample") as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_lowest_id() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[]), Ok(1));
        assert_eq!(
            s.sample(&mut [f32::NAN, f32::NEG_INFINITY, -5.0], &[]),
            Ok(2)
        );
        assert_eq!(
            s.sample(&mut [f32::NAN, f32::NEG_INFINITY], &[]),
            Err(SamplingError::NoFiniteLogits(2))
        );
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            ..Default::default()
        });
        assert_eq!(
            s.sample(&mut [f32::NAN], &[]),
            Err(SamplingError::NoFiniteLogits(1))
        );
    }

    #[test]
    fn temperature_one_matches_softmax() {
        let logits = [0.0f32, 1.0, 2.0, (0.5f32).ln()];
        let n = 40_000;
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                seed: Some(7),
                ..Default::default()
            },
            &logits,
            n,
        );
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (i, &count) in h.iter().enumerate() {
            let expected = logits[i].exp() / z;
            let got = count as f32 / n as f32;
            // 4 sigma of a binomial at n = 40k is < 0.01.
            assert!(
                (got - expected).abs() < 0.01,
                "token {i}: got {got}, expected {expected}"
            );
        }
    }

    #[test]
    fn low_temperature_sharpens_high_flattens() {
        let logits = [0.0f32, 1.0];
        let cold = histogram(
            SamplingParams {
                temperature: 0.25,
                seed: Some(1),
                ..Default::default()
            },
            &logits,
            10_000,
        );
        let hot = histogram(
            SamplingParams {
                temperature: 4.0,
                seed: Some(1),
                ..Default::default()
            },
            &logits,
            10_000,
        );
        // p(1) = sigmoid(1/T): 0.982 cold, 0.562 hot.
        assert!((cold[1] as f32 / 1e4 - 0.982).abs() < 0.01, "{cold:?}");
        assert!((hot[1] as f32 / 1e4 - 0.562).abs() < 0.02, "{hot:?}");
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &[]).expect("sample"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_keeps_only_k_best() {
        let logits = [5.0f32, 4.0, 3.0, 2.0, 1.0, 0.0];
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed: Some(3),
                ..Default::default()
            },
            &logits,
            5000,
        );
        assert!(h[0] > 0 && h[1] > 0);
        assert_eq!(h[2..].iter().sum::<usize>(), 0, "{h:?}");
        // Among the two survivors the ratio is still e^1.
        let ratio = h[0] as f32 / h[1] as f32;
        assert!((ratio - std::f32::consts::E).abs() < 0.35, "ratio {ratio}");
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // probs 0.5, 0.3, 0.15, 0.05
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.75,
                seed: Some(5),
                ..Default::default()
            },
            &logits,
            5000,
        );
        assert!(h[0] > 0 && h[1] > 0 && h[2] == 0 && h[3] == 0, "{h:?}");
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.85,
                seed: Some(5),
                ..Default::default()
            },
            &logits,
            5000,
        );
        assert!(h[2] > 0 && h[3] == 0, "{h:?}");
        // A tiny p still keeps the top token.
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.01,
                seed: Some(5),
                ..Default::default()
            },
            &logits,
            100,
        );
        assert_eq!(h[0], 100);
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_top() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        // floor = 0.5 * 0.29 = 0.145: keeps 0, 1, 2; 0.5 * 0.31 = 0.155 keeps 0, 1.
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.29,
                seed: Some(9),
                ..Default::default()
            },
            &logits,
            5000,
        );
        assert!(h[2] > 0 && h[3] == 0, "{h:?}");
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.31,
                seed: Some(9),
                ..Default::default()
            },
            &logits,
            5000,
        );
        assert!(h[1] > 0 && h[2] == 0, "{h:?}");
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.61,
                seed: Some(9),
                ..Default::default()
            },
            &logits,
            1000,
        );
        assert_eq!(h[0], 1000);
    }

    #[test]
    fn filters_run_after_temperature() {
        // At T=1 probs are ~[0.665, 0.245, 0.090]: top_p 0.95 keeps all three.
        // At T=0.5 they are [0.867, 0.117, 0.016]: top_p 0.95 keeps two.
        let logits = [2.0f32, 1.0, 0.0];
        let h = histogram(
            SamplingParams {
                temperature: 0.5,
                top_p: 0.95,
                seed: Some(2),
                ..Default::default()
            },
            &logits,
            4000,
        );
        assert_eq!(h[2], 0, "{h:?}");
        let h = histogram(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.95,
                seed: Some(2),
                ..Default::default()
            },
            &logits,
            4000,
        );
        assert!(h[2] > 0, "{h:?}");
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut l = [2.0f32, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 0, 0, 99], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0, 0.5]);
        // Greedy flips from token 0 to token 2 once 0 is penalised.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [2.0, 0.0, 1.0], &[]), Ok(0));
        assert_eq!(s.sample(&mut [2.0, 0.0, 1.0], &[0]), Ok(2));
        // The window only looks at the last n tokens.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.5,
            repetition_last_n: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [2.0, 0.0, 1.0], &[0, 1]), Ok(0));
    }

    #[test]
    fn invalid_params_are_named() {
        let e = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .expect_err("top_p 0");
        assert!(e.to_string().contains("top_p"), "{e}");
        let e = Sampler::new(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        })
        .expect_err("nan");
        assert!(e.to_string().contains("temperature"), "{e}");
        assert!(Sampler::new(SamplingParams {
            min_p: 1.5,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn openai_penalties_count_only_the_completion() {
        // Prompt [0, 0]; the completion so far holds 1 twice and 2 once.
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = sampler(p);
        let mut first = vec![1.0, 1.0, 1.0, 1.0];
        s.sample(&mut first, &[0, 0]).expect("sample");
        // Nothing generated yet: the prompt's tokens are not penalised.
        assert_eq!(first, vec![1.0, 1.0, 1.0, 1.0]);
        let mut l = vec![1.0, 1.0, 1.0, 1.0];
        s.sample(&mut l, &[0, 0, 1, 2, 1]).expect("sample");
        assert_eq!(l, vec![1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0]);
        // Greedy follows the penalised logits: 1 was best, 3 now is.
        let mut s = sampler(SamplingParams {
            frequency_penalty: 2.0,
            ..Default::default()
        });
        s.sample(&mut [0.0; 4], &[9])
            .expect("first call sets the prompt");
        let mut l = vec![0.0, 3.0, 0.0, 2.5];
        assert_eq!(s.sample(&mut l, &[9, 1]).expect("sample"), 3);
    }

    #[test]
    fn logit_bias_moves_the_distribution_and_bans() {
        let logits = [0.0f32, 0.0, 0.0];
        // Bias +ln(2) on token 1 doubles its odds: p = [1/4, 1/2, 1/4].
        let p = SamplingParams {
            temperature: 1.0,
            logit_bias: vec![(1, std::f32::consts::LN_2)],
            seed: Some(7),
            ..Default::default()
        };
        let n = 40_000;
        let h = histogram(p, &logits, n);
        for (got, want) in h.iter().zip([0.25, 0.5, 0.25]) {
            let f = *got as f64 / n as f64;
            assert!((f - want).abs() < 0.01, "{h:?}");
        }
        // -100 bans: never sampled.
        let p = SamplingParams {
            temperature: 1.0,
            logit_bias: vec![(0, -100.0)],
            seed: Some(1),
            ..Default::default()
        };
        assert_eq!(histogram(p, &logits, 5000)[0], 0);
        // An id outside the vocabulary is an error, not ignored.
        let mut s = sampler(SamplingParams {
            logit_bias: vec![(3, 1.0)],
            ..Default::default()
        });
        assert_eq!(
            s.sample(&mut logits.to_vec(), &[]),
            Err(SamplingError::BiasOutOfVocab { id: 3, vocab: 3 })
        );
    }

    #[test]
    fn openai_fields_are_range_checked_by_name() {
        for (p, field) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(0, 101.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
        ] {
            match Sampler::new(p) {
                Err(SamplingError::InvalidParam { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
