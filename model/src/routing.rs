//! One token's router scores to its chosen experts and their weights, for
//! every routing rule in [`Routing`], as transformers computes each: one
//! rule in one place, used by the MoE block and by look-ahead gating.

use crate::config::{MoeConfig, Routing};
use moe_kernels::ops;

/// Buffers of [`route`], reused across tokens.
#[derive(Default)]
pub(crate) struct RouteScratch {
    /// Per expert: the scores selection ranks (softmax or biased sigmoid).
    choice: Vec<f32>,
    /// Per group: its rank score.
    groups: Vec<f32>,
    kept: Vec<usize>,
    pair: Vec<usize>,
}

/// Routes one token: `logits` holds the router's logits (plus its bias, if
/// any) and is overwritten with scratch values; `correction` is the
/// selection-only bias of [`Routing::SigmoidGrouped`]. Writes the chosen
/// experts to `ids`, best first by the score selection ranks (ties to the
/// lower index), and their weights to `weights`.
pub(crate) fn route(
    logits: &mut [f32],
    m: &MoeConfig,
    correction: Option<&[f32]>,
    s: &mut RouteScratch,
    ids: &mut Vec<usize>,
    weights: &mut Vec<f32>,
) {
    let k = m.top_k;
    weights.clear();
    match m.routing {
        Routing::SoftmaxTopK => {
            ops::softmax_inplace(logits);
            ops::top_k(logits, k, ids);
            let norm = if m.norm_topk_prob { ids.iter().map(|&e| logits[e]).sum::<f32>() } else { 1.0 };
            weights.extend(ids.iter().map(|&e| logits[e] / norm));
        }
        Routing::TopKSoftmax => {
            ops::top_k(logits, k, ids);
            weights.extend(ids.iter().map(|&e| logits[e]));
            ops::softmax_inplace(weights);
        }
        Routing::SoftmaxGroupLimited { groups, topk_groups } => {
            ops::softmax_inplace(logits);
            let size = logits.len() / groups;
            s.groups.clear();
            s.groups.extend(logits.chunks_exact(size).map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max)));
            ops::top_k(&s.groups, topk_groups, &mut s.kept);
            // the other groups' scores become 0 (not -inf), as transformers masks
            s.choice.clear();
            s.choice
                .extend(logits.iter().enumerate().map(|(e, &p)| if s.kept.contains(&(e / size)) { p } else { 0.0 }));
            ops::top_k(&s.choice, k, ids);
            weights.extend(ids.iter().map(|&e| s.choice[e]));
        }
        Routing::SigmoidGrouped { groups, topk_groups } => {
            logits.iter_mut().for_each(|x| *x = ops::sigmoid(*x));
            s.choice.clear();
            s.choice.extend_from_slice(logits);
            if let Some(b) = correction {
                ops::add_inplace(&mut s.choice, b);
            }
            let size = logits.len() / groups;
            s.groups.clear();
            for g in s.choice.chunks_exact(size) {
                ops::top_k(g, 2, &mut s.pair);
                s.groups.push(s.pair.iter().map(|&e| g[e]).sum());
            }
            ops::top_k(&s.groups, topk_groups, &mut s.kept);
            for (e, c) in s.choice.iter_mut().enumerate() {
                if !s.kept.contains(&(e / size)) {
                    *c = f32::NEG_INFINITY;
                }
            }
            ops::top_k(&s.choice, k, ids);
            weights.extend(ids.iter().map(|&e| logits[e]));
            if m.norm_topk_prob {
                let sum = weights.iter().sum::<f32>() + 1e-20;
                weights.iter_mut().for_each(|w| *w /= sum);
            }
        }
    }
    if m.routed_scaling_factor != 1.0 {
        weights.iter_mut().for_each(|w| *w *= m.routed_scaling_factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExpertAct;

    fn moe(routing: Routing, top_k: usize, norm: bool, scale: f32) -> MoeConfig {
        MoeConfig {
            num_experts: 8,
            top_k,
            expert_ffn: 4,
            norm_topk_prob: norm,
            shared_expert_ffn: None,
            shared_expert_gated: false,
            routed_scaling_factor: scale,
            routing,
            router_bias: false,
            expert_act: ExpertAct::Swiglu,
            expert_bias: false,
        }
    }

    fn run(m: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
        let (mut ids, mut w) = (Vec::new(), Vec::new());
        route(&mut logits.to_vec(), m, bias, &mut RouteScratch::default(), &mut ids, &mut w);
        (ids, w)
    }

    #[test]
    fn group_limited_greedy_keeps_the_groups_of_the_best_experts() {
        // groups of 2: {0,1} {2,3} {4,5} {6,7}; the best experts are in groups 3 and 0
        let logits = [2.0, 0.0, 1.5, 1.6, 0.1, 0.2, 3.0, -1.0];
        let m = moe(Routing::SoftmaxGroupLimited { groups: 4, topk_groups: 2 }, 3, false, 2.0);
        let (ids, w) = run(&m, &logits, None);
        // greedy alone would take 6, 0, 3; group 1 is not kept, so 3 is out
        assert_eq!(ids, vec![6, 0, 1]);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        for (&e, &wt) in ids.iter().zip(&w) {
            assert!((wt - 2.0 * logits[e].exp() / z).abs() < 1e-6, "expert {e}: weight {wt}");
        }
        let greedy = run(&moe(Routing::SoftmaxTopK, 3, false, 1.0), &logits, None).0;
        assert_eq!(greedy, vec![6, 0, 3]);
    }

    #[test]
    fn sigmoid_grouped_selects_with_the_bias_and_weighs_without_it() {
        let logits = [0.5, 0.4, -0.2, 0.0, 1.0, -3.0, 0.3, 0.2];
        let sig: Vec<f32> = logits.iter().map(|&x| ops::sigmoid(x)).collect();
        // the bias lifts expert 5 from worst to best; group scores (sum of top 2):
        // {0,1}: .62+.60, {2,3}: .45+.5, {4,5}: .73+(.05+1), {6,7}: .57+.55
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let m = moe(Routing::SigmoidGrouped { groups: 4, topk_groups: 2 }, 3, true, 2.5);
        let (ids, w) = run(&m, &logits, Some(&bias));
        assert_eq!(ids, vec![5, 4, 0]);
        let sum: f32 = ids.iter().map(|&e| sig[e]).sum();
        for (&e, &wt) in ids.iter().zip(&w) {
            assert!((wt - 2.5 * sig[e] / sum).abs() < 1e-6, "expert {e}: weight {wt}");
        }
        // without renormalisation the weights are the sigmoid values, scaled
        let (_, w) =
            run(&moe(Routing::SigmoidGrouped { groups: 4, topk_groups: 2 }, 3, false, 1.0), &logits, Some(&bias));
        assert_eq!(w, vec![sig[5], sig[4], sig[0]]);
        // one group: plain top-k of the biased scores
        let (ids, _) = run(&moe(Routing::SigmoidGrouped { groups: 1, topk_groups: 1 }, 2, true, 1.0), &logits, None);
        assert_eq!(ids, vec![4, 0]);
    }

    #[test]
    fn masked_groups_lose_even_to_negative_biased_scores() {
        // a strongly negative bias makes every kept score negative; masked
        // experts are -inf, so they still lose
        let logits = [0.0; 8];
        let bias = [-5.0, -5.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0];
        let m = moe(Routing::SigmoidGrouped { groups: 4, topk_groups: 1 }, 2, true, 1.0);
        assert_eq!(run(&m, &logits, Some(&bias)).0, vec![0, 1]);
    }
}
