//! Speculative decoding by prompt lookup: drafts come from the sequence
//! itself (the tokens that followed the last earlier occurrence of its
//! newest n-gram), which is what an agent re-emitting code it has read
//! produces. The generator verifies a draft with one
//! [`Model::forward_steps`](crate::models::Model::forward_steps) pass whose
//! rows equal one-token steps bit for bit, and samples each row exactly as
//! it would have without drafting; a draft token is kept only while it
//! equals what was sampled. Greedy and seeded output are therefore
//! identical with drafting on or off; drafting changes only the time.
//!
//! Whether it pays depends on the machine and the regime: a verify pass of
//! k tokens reads the union of their experts, which under streaming can
//! cost more than k single steps save. [`Drafter`] measures both rates and
//! stops drafting while the verify passes deliver fewer tokens per second
//! than single steps do, probing again later.

use std::time::Duration;

/// How drafting is configured (`mfx run/serve --draft`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecOptions {
    /// Most tokens drafted per verify pass (0: drafting off).
    pub max_draft: usize,
    /// Longest n-gram looked up (tried first), down to `min_ngram`.
    pub max_ngram: usize,
    pub min_ngram: usize,
    /// Stop drafting while it measures slower than plain steps.
    pub auto_off: bool,
}

impl SpecOptions {
    pub const OFF: SpecOptions = SpecOptions {
        max_draft: 0,
        max_ngram: 3,
        min_ngram: 2,
        auto_off: true,
    };

    /// Prompt lookup with llama.cpp's and vLLM's usual sizes.
    pub fn ngram(max_draft: usize) -> SpecOptions {
        SpecOptions {
            max_draft,
            ..SpecOptions::OFF
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_draft > 0
    }
}

impl Default for SpecOptions {
    fn default() -> Self {
        SpecOptions::OFF
    }
}

/// What drafting did during one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftStats {
    /// Verify passes run.
    pub passes: usize,
    /// Draft tokens fed in them.
    pub drafted: usize,
    /// Draft tokens that matched what was sampled (each saved a step).
    pub accepted: usize,
    /// Times auto-off stopped drafting.
    pub paused: usize,
}

impl DraftStats {
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// The tokens that followed the latest earlier occurrence of `seq`'s last
/// `n`-gram (longest `n` first, from `max_ngram` down to `min_ngram`), at
/// most `max` of them. Empty when nothing matches.
pub fn lookup(seq: &[u32], max_ngram: usize, min_ngram: usize, max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    for n in (min_ngram.max(1)..=max_ngram).rev() {
        if seq.len() <= n {
            continue;
        }
        let tail = &seq[seq.len() - n..];
        // Latest occurrence first: recent text predicts best. The match may
        // not be the tail itself, and must leave a token after it.
        let found = (0..seq.len() - n).rev().find(|&s| &seq[s..s + n] == tail);
        if let Some(s) = found {
            let from = s + n;
            let to = (from + max).min(seq.len());
            return seq[from..to].to_vec();
        }
    }
    Vec::new()
}

/// Drafting with adaptive length and auto-off.
#[derive(Debug, Clone)]
pub struct Drafter {
    opts: SpecOptions,
    /// Current draft length cap (grows after full acceptance, shrinks after misses).
    cap: usize,
    /// Seconds per plain one-token step (moving average), once measured.
    step_s: Option<f64>,
    /// Seconds per token delivered by verify passes (moving average).
    spec_s: Option<f64>,
    /// Plain steps to take before drafting again after a pause.
    pause_left: usize,
    /// Length of the next pause (doubles while drafting keeps losing).
    pause_len: usize,
    pub stats: DraftStats,
}

const EWMA: f64 = 0.25;
const FIRST_PAUSE: usize = 16;
const MAX_PAUSE: usize = 256;

impl Drafter {
    pub fn new(opts: SpecOptions) -> Drafter {
        Drafter {
            opts,
            cap: opts.max_draft,
            step_s: None,
            spec_s: None,
            pause_left: 0,
            pause_len: FIRST_PAUSE,
            stats: DraftStats::default(),
        }
    }

    /// A draft to verify after `seq` (at most `room` tokens), or empty for
    /// a plain step.
    pub fn draft(&mut self, seq: &[u32], room: usize) -> Vec<u32> {
        if !self.opts.enabled() || self.pause_left > 0 || room == 0 {
            self.pause_left = self.pause_left.saturating_sub(1);
            return Vec::new();
        }
        // Auto-off needs the plain rate to compare against: measure a step first.
        if self.opts.auto_off && self.step_s.is_none() {
            return Vec::new();
        }
        let max = self.cap.min(room);
        lookup(seq, self.opts.max_ngram, self.opts.min_ngram, max)
    }

    /// A plain one-token step took `t`.
    pub fn plain_step(&mut self, t: Duration) {
        let t = t.as_secs_f64();
        self.step_s = Some(self.step_s.map_or(t, |s| s + EWMA * (t - s)));
    }

    /// A verify pass of `drafted` draft tokens took `t`, and `accepted` of them held.
    pub fn verified(&mut self, drafted: usize, accepted: usize, t: Duration) {
        self.stats.passes += 1;
        self.stats.drafted += drafted;
        self.stats.accepted += accepted;
        // Full acceptance: try longer drafts; a miss: draft what held, plus one.
        self.cap = if accepted == drafted {
            (self.cap + 2).min(self.opts.max_draft)
        } else {
            (accepted + 1).clamp(1, self.opts.max_draft)
        };
        // The pass delivered accepted + 1 tokens (the last row's token comes free).
        let per_token = t.as_secs_f64() / (accepted + 1) as f64;
        self.spec_s = Some(self.spec_s.map_or(per_token, |s| s + EWMA * (per_token - s)));
        if !self.opts.auto_off {
            return;
        }
        if let (Some(step), Some(spec)) = (self.step_s, self.spec_s) {
            if spec > step && self.stats.passes >= 2 {
                self.pause_left = self.pause_len;
                self.pause_len = (self.pause_len * 2).min(MAX_PAUSE);
                self.spec_s = None;
                self.stats.paused += 1;
            } else if spec < step {
                self.pause_len = FIRST_PAUSE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_latest_longest_match() {
        // "1 2 3" occurs twice before the tail; the latest one is followed by 9 8.
        let seq = [1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 7, 1, 2, 3];
        assert_eq!(lookup(&seq, 3, 1, 2), vec![9, 8]);
        assert_eq!(lookup(&seq, 3, 1, 10), vec![9, 8, 7, 1, 2, 3]);
        // Only the 1-gram "7" matches, at position 0.
        assert_eq!(lookup(&[7, 6, 5, 7], 3, 1, 4), vec![6, 5, 7]);
        assert_eq!(lookup(&[7, 6, 5, 7], 3, 2, 4), Vec::<u32>::new());
        assert_eq!(lookup(&[1, 2, 3], 3, 1, 4), Vec::<u32>::new());
        assert_eq!(lookup(&[1, 1], 3, 1, 0), Vec::<u32>::new());
    }

    #[test]
    fn auto_off_pauses_when_verify_is_slower_and_probes_again() {
        let mut d = Drafter::new(SpecOptions::ngram(4));
        let seq = [1, 2, 3, 1, 2, 3, 1, 2];
        // No plain-step time yet: no draft.
        assert!(d.draft(&seq, 10).is_empty());
        d.plain_step(Duration::from_millis(10));
        assert_eq!(d.draft(&seq, 10), vec![3, 1, 2]);
        // Two passes that deliver one token per 50 ms: slower than 10 ms steps.
        d.verified(3, 0, Duration::from_millis(50));
        d.verified(1, 0, Duration::from_millis(50));
        assert_eq!(d.stats.paused, 1);
        for _ in 0..FIRST_PAUSE {
            assert!(d.draft(&seq, 10).is_empty());
        }
        assert!(!d.draft(&seq, 10).is_empty());
        // Fast passes keep it on.
        let mut d = Drafter::new(SpecOptions::ngram(4));
        d.plain_step(Duration::from_millis(10));
        for _ in 0..5 {
            d.verified(4, 4, Duration::from_millis(15));
        }
        assert_eq!(d.stats.paused, 0);
        assert_eq!(d.stats.accepted, 20);
    }
}
