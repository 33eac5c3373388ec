//! Rotary-embedding angles, computed as HuggingFace computes them: inverse
//! frequencies and `position * inv_freq` in f32, cosine and sine of that.

use crate::config::{AttentionConfig, RopeScaling};

/// Inverse frequencies of one head width.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub(crate) fn new(a: &AttentionConfig) -> Self {
        let d = a.head_dim;
        let base = a.rope_theta as f32;
        let factor = match a.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => factor as f32,
        };
        let inv_freq = (0..d / 2).map(|j| 1.0 / base.powf((2 * j) as f32 / d as f32) / factor).collect();
        Self { inv_freq }
    }

    /// Half the head width: the number of angles.
    pub(crate) fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Writes the cosines and sines of position `pos`.
    pub(crate) fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (pos as f32 * f) as f64;
            *c = a.cos() as f32;
            *s = a.sin() as f32;
        }
    }
}
