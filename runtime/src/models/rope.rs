//! Rotary position embedding, "rotate_half" (GPT-NeoX) style as in
//! transformers' `apply_rotary_pos_emb`: dimension `i` of the first half
//! pairs with `i + head_dim/2`, not with its neighbour.

/// Default (unscaled) rope. Angles are computed per position on the fly: a
/// table for a 128k context would cost more memory than the trig it saves.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = 1 / theta^(2i / head_dim)`, computed in f32 exactly as
    /// transformers does (`base ** (arange(0, dim, 2).float() / dim)`), so the
    /// angles round the same way.
    pub fn new(theta: f32, head_dim: usize) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq }
    }

    /// `cos`/`sin` of every frequency at `pos` (each `head_dim / 2` long).
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = pos as f32 * f;
            *c = a.cos();
            *s = a.sin();
        }
    }

    /// Rotates every head of `x` (`heads * head_dim` values of one position).
    pub fn apply(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for h in x.chunks_exact_mut(head_dim) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}
