//! Routing-path predictors: forecast which experts each token of a step will
//! use in the coming MoE layers, before those layers run, so that the cache
//! can start loading them.
//!
//! Layers here are MoE-layer indices ([`MoeLayerId`], 0 = the first MoE layer). A forecast is
//! per token: `top_k` expert ids per token in batch order, [`NO_EXPERT`] where
//! the predictor has nothing to say about a token.

mod combined;
mod file;
mod hidden;
mod hidden_train;
mod learned;
mod lookahead;
mod previous;
mod probe_mlp;

pub use combined::Combined;
pub use file::format_of;
pub use hidden::{HiddenPredictor, HiddenProbes, HIDDEN_PREDICTOR_FORMAT, HIDDEN_PREDICTOR_VERSION};
pub use hidden_train::{train_hidden, HiddenTrainConfig, HiddenTrainReport, TokenEmbeddings};
pub use learned::{train, LearnedPredictor, PathTables, TrainReport, PREDICTOR_FORMAT, PREDICTOR_VERSION};
pub use lookahead::LookAhead;
pub use previous::PreviousToken;

use crate::OffloadError;
use moe_model::StepToken;
use moe_types::{ExpertId, MoeLayerId, SeqId};
use std::path::PathBuf;
use std::sync::Arc;

/// Placeholder id for "no forecast for this token".
pub const NO_EXPERT: ExpertId = ExpertId(u16::MAX);

/// A forecast of one MoE layer for every token of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct Forecast {
    /// The MoE layer forecast.
    pub layer: MoeLayerId,
    /// `tokens * top_k` ids, strongest first; [`NO_EXPERT`] for unknown.
    pub ids: Vec<ExpertId>,
}

/// The model facts a predictor needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// MoE layers.
    pub layers: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// How many MoE layers ahead to forecast.
    pub depth: usize,
}

/// A routing-path predictor. Calls arrive in step order: `begin_step`, then
/// for each MoE layer `gating` (look-ahead forecasts from the model, if
/// [`lookahead`](Self::lookahead) asked for them) and `observe` (the layer's
/// actual routing). Deterministic: no clocks, no randomness.
pub trait PathPredictor: Send {
    /// MoE layers ahead for which the model should run look-ahead gating.
    fn lookahead(&self) -> usize {
        0
    }
    /// A step starts over `tokens`; forecasts for its first layers go to `out`.
    fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>);
    /// MoE layer `layer` routed the step's tokens to `ids` (`tokens * top_k`).
    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>);
    /// Look-ahead gating: while layer `from` ran, layer `layer`'s router chose `ids`.
    fn gating(&mut self, from: MoeLayerId, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        let _ = (from, layer, ids, out);
    }
    /// Whether the predictor reads hidden states ([`hidden`](Self::hidden)).
    fn wants_hidden(&self) -> bool {
        false
    }
    /// The residual stream entering MoE layer `layer`, before its attention
    /// (`tokens * hidden_size` values, batch order).
    fn hidden(&mut self, layer: MoeLayerId, h: &[f32], out: &mut Vec<Forecast>) {
        let _ = (layer, h, out);
    }
    /// A sequence ended.
    fn end_sequence(&mut self, seq: SeqId) {
        let _ = seq;
    }
    /// The whole path (`layers * top_k` ids) of a token about to run, as far
    /// as it can be told before the step (for regrouping); `None` if not.
    fn path(&self, token: StepToken) -> Option<Vec<ExpertId>> {
        let _ = token;
        None
    }
}

/// Which predictor `--predictor` selects.
#[derive(Clone, Debug, PartialEq)]
pub enum PredictorKind {
    /// No forecasts: loads happen on demand only.
    None,
    /// The same sequence's previous token's path.
    PreviousToken,
    /// Apply the next layers' routers to the current hidden state.
    LookAhead,
    /// The learned path predictor in this file.
    Learned(PathBuf),
    /// The hidden-state probes in this file.
    Hidden(PathBuf),
    /// These predictors side by side, each layer forecast by the one right
    /// most often there so far ([`Combined`]).
    Combined(Vec<PredictorKind>),
}

impl PredictorKind {
    /// The flag value.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PreviousToken => "previous",
            Self::LookAhead => "lookahead",
            Self::Learned(_) => "learned",
            Self::Hidden(_) => "hidden",
            Self::Combined(m) if matches!(m.as_slice(), [Self::Hidden(_), Self::Learned(_)]) => "hidden+learned",
            Self::Combined(_) => "combined",
        }
    }

    /// Checks that predictors reading hidden states were trained for a model
    /// of width `hidden` (the shape checks in [`build`](Self::build) cannot
    /// see it).
    pub fn check_width(&self, hidden: usize) -> Result<(), OffloadError> {
        match self {
            Self::Hidden(path) => {
                let p = HiddenProbes::load(path)?;
                let shape = Shape { layers: p.layers, experts: p.experts, top_k: p.top_k, depth: 1 };
                p.check_shape(shape, Some(hidden), path)
            }
            Self::Combined(members) => members.iter().try_for_each(|m| m.check_width(hidden)),
            _ => Ok(()),
        }
    }

    /// Builds the predictor for `shape` (`None` for [`PredictorKind::None`]).
    pub fn build(&self, shape: Shape) -> Result<Option<Box<dyn PathPredictor>>, OffloadError> {
        Ok(match self {
            Self::None => None,
            Self::PreviousToken => Some(Box::new(PreviousToken::new(shape))),
            Self::LookAhead => Some(Box::new(LookAhead::new(shape))),
            Self::Learned(path) => {
                let tables = PathTables::load(path)?;
                tables.check_shape(shape, path)?;
                Some(Box::new(LearnedPredictor::new(Arc::new(tables), shape)))
            }
            Self::Hidden(path) => {
                let probes = HiddenProbes::load(path)?;
                probes.check_shape(shape, None, path)?;
                Some(Box::new(HiddenPredictor::new(Arc::new(probes), shape)))
            }
            Self::Combined(members) => {
                let built = members.iter().map(|m| m.build(shape)).collect::<Result<Vec<_>, _>>()?;
                Some(Box::new(Combined::new(built.into_iter().flatten().collect(), shape)))
            }
        })
    }
}

/// What `--predictor` names, parsed at the edge; [`PredictorChoice::resolve`]
/// turns it into a [`PredictorKind`] once the model directory is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum PredictorChoice {
    /// The hidden-state probes when their file exists, else the learned
    /// predictor when its file does, else look-ahead gating. (Measured on
    /// the built-in model's held-out text at a 50% budget: the probes are
    /// right 0.92 of the time against 0.78, load a fifth fewer bytes, and
    /// stalled least at batch 4; `hidden+learned` did no better; see
    /// BENCHMARKS.md.)
    #[default]
    Auto,
    /// No forecasts.
    None,
    /// The previous token's path.
    Previous,
    /// Look-ahead gating.
    LookAhead,
    /// The learned predictor (its file must exist).
    Learned,
    /// The hidden-state probes (their file must exist).
    Hidden,
}

impl PredictorChoice {
    /// Every choice, in help order.
    pub const ALL: [PredictorChoice; 6] =
        [Self::Auto, Self::Hidden, Self::Learned, Self::LookAhead, Self::Previous, Self::None];

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Previous => "previous",
            Self::LookAhead => "lookahead",
            Self::Learned => "learned",
            Self::Hidden => "hidden",
        }
    }

    /// The predictor for a model whose learned-predictor file is
    /// `learned_file` and hidden-state probes file `hidden_file`.
    pub fn resolve(self, learned_file: PathBuf, hidden_file: PathBuf) -> PredictorKind {
        match self {
            Self::Auto if hidden_file.is_file() => PredictorKind::Hidden(hidden_file),
            Self::Auto if learned_file.is_file() => PredictorKind::Learned(learned_file),
            Self::Hidden => PredictorKind::Hidden(hidden_file),
            Self::Auto | Self::LookAhead => PredictorKind::LookAhead,
            Self::None => PredictorKind::None,
            Self::Previous => PredictorKind::PreviousToken,
            Self::Learned => PredictorKind::Learned(learned_file),
        }
    }
}

impl std::str::FromStr for PredictorChoice {
    type Err = OffloadError;
    fn from_str(s: &str) -> Result<Self, OffloadError> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            OffloadError::Config(format!(
                "unknown predictor {s:?} (expected auto, hidden, learned, lookahead, previous or none)"
            ))
        })
    }
}

moe_types::setting_from_str!(named PredictorChoice);

/// How a forecast (`tokens * k` ids, [`NO_EXPERT`] for none) did against a
/// layer's routing: (experts predicted, of them used); (0, 0) if the two
/// cover different token counts.
pub(crate) fn score(forecast: &[ExpertId], actual: &[ExpertId], k: usize) -> (u64, u64) {
    if forecast.len() != actual.len() || k == 0 {
        return (0, 0);
    }
    let (mut predicted, mut right) = (0, 0);
    for (pred, used) in forecast.chunks_exact(k).zip(actual.chunks_exact(k)) {
        for p in pred.iter().filter(|&&p| p != NO_EXPERT) {
            predicted += 1;
            right += u64::from(used.contains(p));
        }
    }
    (predicted, right)
}

/// Layers `from..from + depth` below `layers`.
pub(crate) fn window(from: usize, depth: usize, layers: usize) -> std::ops::Range<usize> {
    from.min(layers)..(from + depth).min(layers)
}
