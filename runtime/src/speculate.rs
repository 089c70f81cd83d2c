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
//! Whether it pays depends on the machine and the model: a verify pass of
//! k tokens runs the union of their experts, so on an MoE it can cost
//! nearly k steps. [`Drafter`] measures what a plain step costs and what
//! each drafted token adds to a pass, estimates the share of drafts that
//! hold (also from drafts it did not verify, checked against the tokens as
//! they come), and verifies only while the expected saving exceeds the cost.

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
    /// Drafts found but not verified because they were not expected to pay.
    pub skipped: usize,
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

/// Drafting with adaptive length and a cost model (auto-off).
#[derive(Debug, Clone)]
pub struct Drafter {
    opts: SpecOptions,
    /// Current draft length cap (grows after full acceptance, shrinks after misses).
    cap: usize,
    /// Seconds per plain one-token step (moving average), once measured.
    step_s: Option<f64>,
    /// Seconds each drafted token adds to a pass over a plain step.
    extra_s: Option<f64>,
    /// Share of drafted tokens that hold (moving average, real and shadow drafts).
    accept: f64,
    /// A draft not verified, compared with the tokens as they are sampled:
    /// (draft, tokens matched so far).
    shadow: Option<(Vec<u32>, usize)>,
    /// Steps since the last verify pass (the cost is re-measured now and then).
    since_pass: usize,
    pub stats: DraftStats,
}

const EWMA: f64 = 0.25;
/// Verify a draft at least this often, so a changed cost is noticed.
const REPROBE: usize = 256;

impl Drafter {
    pub fn new(opts: SpecOptions) -> Drafter {
        Drafter {
            opts,
            // Start short: the first pass mostly measures what drafting costs.
            cap: opts.max_draft.min(2),
            step_s: None,
            extra_s: None,
            accept: 0.5,
            shadow: None,
            since_pass: 0,
            stats: DraftStats::default(),
        }
    }

    /// A draft to verify after `seq` (at most `room` tokens), or empty for
    /// a plain step.
    pub fn draft(&mut self, seq: &[u32], room: usize) -> Vec<u32> {
        self.since_pass += 1;
        if !self.opts.enabled() || room == 0 {
            return Vec::new();
        }
        let draft = lookup(
            seq,
            self.opts.max_ngram,
            self.opts.min_ngram,
            self.cap.min(room),
        );
        if draft.is_empty() || !self.opts.auto_off {
            return draft;
        }
        let pays = match (self.step_s, self.extra_s) {
            // The plain rate comes first (one step), then one pass measures the cost.
            (None, _) => false,
            (Some(_), None) => true,
            (Some(step), Some(extra)) => self.accept * step > extra || self.since_pass >= REPROBE,
        };
        if pays {
            return draft;
        }
        if self.shadow.is_none() {
            self.shadow = Some((draft, 0));
        }
        self.stats.skipped += 1;
        Vec::new()
    }

    /// A token was sampled on a plain step: scores the pending shadow draft.
    pub fn observe(&mut self, token: u32) {
        let Some((draft, matched)) = self.shadow.as_mut() else {
            return;
        };
        if draft.get(*matched) == Some(&token) {
            *matched += 1;
            if *matched < draft.len() {
                return;
            }
        }
        let share = *matched as f64 / draft.len() as f64;
        self.accept += EWMA * (share - self.accept);
        self.shadow = None;
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
        self.since_pass = 0;
        self.shadow = None;
        // Full acceptance: try longer drafts; a miss: draft what held, plus one.
        self.cap = if accepted == drafted {
            (self.cap + 2).min(self.opts.max_draft)
        } else {
            (accepted + 1).clamp(1, self.opts.max_draft)
        };
        if drafted == 0 {
            return;
        }
        self.accept += EWMA * (accepted as f64 / drafted as f64 - self.accept);
        if let Some(step) = self.step_s {
            let extra = ((t.as_secs_f64() - step) / drafted as f64).max(0.0);
            self.extra_s = Some(self.extra_s.map_or(extra, |e| e + EWMA * (extra - e)));
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
    fn auto_off_verifies_only_while_it_pays() {
        let mut d = Drafter::new(SpecOptions::ngram(4));
        let seq = [1, 2, 3, 1, 2, 3, 1, 2];
        // No plain-step time yet: no draft.
        assert!(d.draft(&seq, 10).is_empty());
        d.plain_step(Duration::from_millis(10));
        // One short pass measures the cost: 2 drafted tokens added 20 ms.
        assert_eq!(d.draft(&seq, 10), vec![3, 1]);
        d.verified(2, 0, Duration::from_millis(30));
        // 10 ms per drafted token against 10 ms * acceptance (< 1): skip,
        // and score the draft against the tokens that come.
        assert!(d.draft(&seq, 10).is_empty());
        assert_eq!(d.stats.skipped, 2); // this one and the first (no step time yet)
                                        // After a miss the cap is 1: the skipped draft was [3], and it held.
        d.observe(3);
        assert!(d.accept > 0.5);
        // Still not paying at this cost.
        assert!(d.draft(&seq, 10).is_empty());
        // A cheap pass (batched weights): drafting pays and stays on.
        let mut d = Drafter::new(SpecOptions::ngram(4));
        d.plain_step(Duration::from_millis(10));
        let mut lens = Vec::new();
        for _ in 0..4 {
            let n = d.draft(&seq, 10).len();
            lens.push(n);
            d.verified(n, n, Duration::from_millis(12));
        }
        // Full acceptance lengthens the drafts (here to the 3 tokens the
        // lookup finds after the match).
        assert_eq!(lens, vec![2, 3, 3, 3]);
        assert_eq!(d.stats.skipped, 0);
        assert_eq!(d.stats.accepted, 11);
    }
}
