//! What the device forward pass needs of the experts.

use super::Device;
use crate::Result;
use moe_types::{ExpertId, LayerId, LayerRouting};

/// The experts' fast tier on a device, as the forward pass drives it. Per MoE
/// layer, in order: [`hidden`](Self::hidden) (when wanted),
/// [`prepare`](Self::prepare), [`forecast`](Self::forecast) for each later
/// layer when [`lookahead`](Self::lookahead) asks, [`expert`](Self::expert)
/// for each expert's product, then [`release`](Self::release) (also when a
/// product failed).
pub trait DeviceExperts<D: Device> {
    /// MoE layers ahead to apply later routers to the current hidden states.
    fn lookahead(&self) -> usize {
        0
    }

    /// Look-ahead gating: while MoE layer `from` runs, `layer`'s router chose `ids`.
    fn forecast(&mut self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let _ = (from, layer, ids);
    }

    /// Whether the residual stream entering each MoE layer should be shown
    /// (copied to the host) before the layer runs.
    fn wants_hidden(&self) -> bool {
        false
    }

    /// The residual stream entering MoE layer `layer` (`tokens * hidden`).
    fn hidden(&mut self, layer: LayerId, h: &[f32]) {
        let _ = (layer, h);
    }

    /// MoE layer `routing.layer` runs next over the distinct experts `used`
    /// (ascending): every one of them is resident or its copy queued ahead of
    /// the compute that reads it, and pinned until [`release`](Self::release).
    fn prepare(&mut self, routing: &LayerRouting, used: &[ExpertId]) -> Result<()>;

    /// A prepared expert of decoder layer `layer`, for its product.
    fn expert(&mut self, layer: LayerId, expert: ExpertId) -> Result<D::Expert<'_>>;

    /// The products reading the layer's experts are queued: their pins go
    /// (a later copy into their slots still waits for those products).
    fn release(&mut self, layer: LayerId, used: &[ExpertId]) -> Result<()>;
}
