//! The one rotary position embedding: "rotate_half" (GPT-NeoX) pairing as
//! in transformers' `apply_rotary_pos_emb` (dimension `i` of the rotated
//! slice pairs with `i + rotary_dim/2`), over the first `rotary_dim`
//! dimensions of a head from some offset (partial rotary: glm4_moe,
//! qwen3_next; MLA's rope part after the no-rope dims), optionally
//! de-interleaved first (`rope_interleave`, DeepSeek: `[x0,x1,x2,x3..]`
//! becomes `[x0,x2,..,x1,x3,..]` as `apply_rotary_pos_emb_interleave`
//! does), with unscaled or YaRN frequencies.
//!
//! Angles are computed per position on the fly: a table for a 128k context
//! would cost more memory than the trig it saves.

/// YaRN parameters (`rope_type: yarn`), as transformers'
/// `_compute_yarn_parameters` reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Overrides the magnitude scaling of cos/sin when given.
    pub attention_factor: Option<f64>,
    /// Round the correction range outwards (default true).
    pub truncate: bool,
}

/// `0.1 * mscale * ln(scale) + 1` for `scale > 1`, else 1 (transformers' `get_mscale`).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Yarn {
    /// The factor cos and sin are multiplied by (`attention_factor`).
    pub fn attention_factor(&self) -> f32 {
        let f = match (self.attention_factor, self.mscale, self.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_mscale(self.factor, m) / yarn_mscale(self.factor, all)
            }
            _ => yarn_mscale(self.factor, 1.0),
        };
        f as f32
    }

    /// The factor MLA multiplies its softmax scale by (transformers'
    /// `yarn_apply_mscale`): `get_mscale(factor, mscale_all_dim)^2` when
    /// `mscale_all_dim` is set and non-zero, else 1. DeepSeek's YaRN scales
    /// every dimension of `q . k`, not only the rotated ones.
    pub fn softmax_mscale(&self) -> f32 {
        match self.mscale_all_dim {
            Some(all) if all != 0.0 => {
                let m = yarn_mscale(self.factor, all);
                (m * m) as f32
            }
            _ => 1.0,
        }
    }

    /// Blends interpolated (`/ factor`) and extrapolated (unscaled)
    /// frequencies with a linear ramp between the correction dims of
    /// `beta_fast` and `beta_slow` rotations over the original context.
    fn inv_freq(&self, theta: f32, dim: usize) -> Vec<f32> {
        let base = theta as f64;
        let corr = |rot: f64| {
            (dim as f64
                * (self.original_max_position as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (corr(self.beta_fast), corr(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        // As torch rounds it: the range's width in f64 (Python floats), the
        // ramp itself in f32.
        let (low32, width) = (low as f32, (high - low) as f32);
        let factor = self.factor as f32;
        (0..dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f32 / dim as f32);
                let extra = 1.0 / pos_freq;
                let inter = 1.0 / (factor * pos_freq);
                let ramp = ((i as f32 - low32) / width).clamp(0.0, 1.0);
                let extra_factor = 1.0 - ramp;
                inter * (1.0 - extra_factor) + extra * extra_factor
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    interleave: bool,
    /// cos/sin magnitude (YaRN's attention factor; 1 otherwise).
    scale: f32,
}

impl Rope {
    /// Unscaled rope over `rotary_dim` dimensions: `inv_freq[i] = 1 /
    /// theta^(2i / rotary_dim)`, computed in f32 exactly as transformers
    /// does (`base ** (arange(0, dim, 2).float() / dim)`), so the angles
    /// round the same way.
    pub fn new(theta: f32, rotary_dim: usize) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        Rope {
            inv_freq,
            interleave: false,
            scale: 1.0,
        }
    }

    /// Rope with the config's scaling.
    pub fn scaled(theta: f32, rotary_dim: usize, scaling: &super::config::RopeScaling) -> Self {
        match scaling {
            super::config::RopeScaling::None => Self::new(theta, rotary_dim),
            super::config::RopeScaling::Yarn(y) => Rope {
                inv_freq: y.inv_freq(theta, rotary_dim),
                interleave: false,
                scale: y.attention_factor(),
            },
        }
    }

    /// De-interleave the rotated slice before rotating (DeepSeek's `rope_interleave`).
    pub fn interleaved(mut self, yes: bool) -> Self {
        self.interleave = yes;
        self
    }

    /// Dimensions rotated per head.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos`/`sin` of every frequency at `pos` (each `rotary_dim / 2` long).
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = pos as f32 * f;
            *c = a.cos() * self.scale;
            *s = a.sin() * self.scale;
        }
    }

    /// Rotates dims `offset..offset + rotary_dim` of every `stride`-wide
    /// head of `x` (one position) by the angles `cos`/`sin`.
    pub fn rotate(&self, x: &mut [f32], stride: usize, offset: usize, cos: &[f32], sin: &[f32]) {
        let half = self.inv_freq.len();
        let mut tmp = Vec::new();
        for h in x.chunks_exact_mut(stride) {
            let r = &mut h[offset..offset + 2 * half];
            if self.interleave {
                tmp.clear();
                tmp.extend_from_slice(r);
                for i in 0..half {
                    r[i] = tmp[2 * i];
                    r[i + half] = tmp[2 * i + 1];
                }
            }
            let (a, b) = r.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }

    /// Rotates `n` positions `past..past + n` of each of `xs` (`[n, width]`
    /// rows of `stride`-wide heads, `offset` into each head): the angles of
    /// a position are computed once for all of them.
    pub fn apply(
        &self,
        xs: &mut [&mut [f32]],
        n: usize,
        stride: usize,
        offset: usize,
        past: usize,
    ) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0.0; half], vec![0.0; half]);
        for i in 0..n {
            self.angles(past + i, &mut cos, &mut sin);
            for x in xs.iter_mut() {
                let w = x.len() / n;
                self.rotate(&mut x[i * w..(i + 1) * w], stride, offset, &cos, &sin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f64) -> Yarn {
        Yarn {
            factor,
            original_max_position: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        }
    }

    /// YaRN keeps the fast (high-frequency) dims unscaled, divides the slow
    /// ones by the factor, blends in between, and scales cos/sin by
    /// `0.1 ln(factor) + 1`; at factor 1 it is the plain rope.
    #[test]
    fn yarn_blends_between_extrapolation_and_interpolation() {
        let (theta, dim) = (150000.0f32, 64);
        let plain = Rope::new(theta, dim).inv_freq;
        let y = yarn(32.0);
        let f = y.inv_freq(theta, dim);
        // Correction dims for 4096 positions, base 150000, dim 64:
        // beta_fast 32 -> floor(8.09) = 8, beta_slow 1 -> ceil(17.55) = 18.
        for i in 0..8 {
            assert!((f[i] - plain[i]).abs() <= 1e-7 * plain[i], "dim {i}");
        }
        for i in 18..32 {
            assert!((f[i] - plain[i] / 32.0).abs() <= 1e-6 * plain[i], "dim {i}");
        }
        for i in 9..18 {
            assert!(f[i] < plain[i] && f[i] > plain[i] / 32.0, "dim {i}");
        }
        assert!((y.attention_factor() - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
        let one = yarn(1.0);
        for (a, b) in one.inv_freq(theta, dim).iter().zip(&plain) {
            assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
        }
        assert_eq!(one.attention_factor(), 1.0);
    }

    #[test]
    fn partial_interleaved_rotation_touches_only_its_slice() {
        let r = Rope::new(10000.0, 4).interleaved(true);
        let mut x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let (mut c, mut s) = (vec![0.0; 2], vec![0.0; 2]);
        r.angles(0, &mut c, &mut s);
        // Position 0: no rotation, so only the de-interleave shows.
        r.rotate(&mut x, 6, 2, &c, &s);
        assert_eq!(x, vec![0., 1., 2., 4., 3., 5., 6., 7., 8., 10., 9., 11.]);
    }
}
