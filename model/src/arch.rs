//! Tensor names of each architecture, in one place, so the loader and a
//! later on-demand expert reader agree on them.

use crate::config::Arch;

/// Names of one layer's tensors.
pub(crate) struct LayerNames {
    arch: Arch,
    prefix: String,
}

impl LayerNames {
    pub(crate) fn new(arch: Arch, layer: usize) -> Self {
        Self { arch, prefix: format!("model.layers.{layer}") }
    }

    pub(crate) fn get(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    fn moe_prefix(&self) -> &'static str {
        match self.arch {
            Arch::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }

    /// The router (gate) matrix `[experts, hidden]`.
    pub(crate) fn router(&self) -> String {
        match self.arch {
            Arch::GptOss => self.get("mlp.router.weight"),
            _ => self.get(&format!("{}.gate.weight", self.moe_prefix())),
        }
    }

    /// The router's bias `[experts]` (gpt-oss).
    pub(crate) fn router_bias(&self) -> String {
        self.get("mlp.router.bias")
    }

    /// The router's selection-only correction bias `[experts]` (DeepSeek-V3, GLM).
    pub(crate) fn correction_bias(&self) -> String {
        self.get("mlp.gate.e_score_correction_bias")
    }

    /// The shared expert's sub-module (`mlp.{shared}`).
    pub(crate) fn shared_expert(&self) -> &'static str {
        match self.arch {
            Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => "shared_experts",
            _ => "shared_expert",
        }
    }

    /// An expert's `[gate, up, down]` matrices.
    pub(crate) fn expert(&self, e: usize) -> [String; 3] {
        let p = format!("{}.experts.{e}", self.moe_prefix());
        match self.arch {
            Arch::Mixtral => [
                self.get(&format!("{p}.w1.weight")),
                self.get(&format!("{p}.w3.weight")),
                self.get(&format!("{p}.w2.weight")),
            ],
            _ => [
                self.get(&format!("{p}.gate_proj.weight")),
                self.get(&format!("{p}.up_proj.weight")),
                self.get(&format!("{p}.down_proj.weight")),
            ],
        }
    }

    /// A dense layer's MLP `[gate, up, down]`, or with `sub = "shared_expert"`
    /// the shared expert's.
    pub(crate) fn mlp(&self, sub: Option<&str>) -> [String; 3] {
        let p = match sub {
            Some(s) => format!("mlp.{s}"),
            None => "mlp".to_string(),
        };
        [
            self.get(&format!("{p}.gate_proj.weight")),
            self.get(&format!("{p}.up_proj.weight")),
            self.get(&format!("{p}.down_proj.weight")),
        ]
    }
}
