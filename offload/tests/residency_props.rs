//! Property tests of the residency core: random routings, budgets, pins and
//! mover completion orders (loads finishing out of order, failing, evictions
//! acknowledged late) never break an invariant.

use moe_model::StepToken;
use moe_offload::residency::{Command, ExpertKey, Pin, ResidencyConfig, ResidencyCore, State};
use moe_offload::{PolicyKind, PredictorKind};
use moe_types::{ExpertId, LayerId, LayerRouting, MoeLayerId, SeqId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Take the next command from the core.
    /// A mover polls; `false`: it only takes demand loads.
    Poll(bool),
    /// Finish the n-th outstanding command (a load fails when `fail`).
    Complete { n: usize, fail: bool },
    /// Pin the n-th expert the running layer uses.
    Pin(usize),
    /// Release the n-th pin held.
    Unpin(usize),
    /// Run the next MoE layer with these per-token choices (seeds).
    Layer(Vec<u16>),
    /// Begin a new step.
    Step,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Poll(true)),
        1 => Just(Op::Poll(false)),
        3 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(n, fail)| Op::Complete { n, fail }),
        2 => any::<usize>().prop_map(Op::Pin),
        2 => any::<usize>().prop_map(Op::Unpin),
        2 => prop::collection::vec(any::<u16>(), 1..6).prop_map(Op::Layer),
        1 => Just(Op::Step),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    layers: usize,
    experts: usize,
    top_k: usize,
    extra_slots: usize,
    policy: PolicyKind,
    predictor: PredictorKind,
}

fn setup() -> impl Strategy<Value = Setup> {
    (1usize..4, 2usize..7, 1usize..3, 0usize..10, 0usize..4).prop_map(|(layers, experts, k, extra_slots, p)| {
        let (policy, predictor) = match p {
            0 => (PolicyKind::Lru, PredictorKind::None),
            1 => (PolicyKind::Lfu, PredictorKind::PreviousToken),
            2 => (PolicyKind::Predictive, PredictorKind::PreviousToken),
            _ => (PolicyKind::Lru, PredictorKind::LookAhead),
        };
        Setup { layers, experts, top_k: k.min(experts), extra_slots, policy, predictor }
    })
}

/// The mover's view: commands taken and not yet reported.
struct Harness {
    core: ResidencyCore,
    s: Setup,
    outstanding: Vec<Command>,
    pins: Vec<ExpertKey>,
    layer: usize,
    used: Vec<ExpertId>,
    tokens: Vec<StepToken>,
    ok_loads: u64,
    /// The last poll returned an eviction (the load after it was issued then).
    after_evict: bool,
}

impl Harness {
    fn apply(&mut self, op: Op) {
        let (ne, k) = (self.s.experts, self.s.top_k);
        match op {
            Op::Poll(prefetch_ok) => {
                let (pinned, running): (Vec<_>, Vec<_>) = (0..self.s.layers * ne)
                    .map(|i| ExpertKey::from_flat(i, ne))
                    .map(|key| (self.core.pins(key) > 0, self.core.in_use(key)))
                    .unzip();
                let polled = self.core.poll(prefetch_ok);
                let after_evict = matches!(polled, Some(Command::Evict { .. }));
                if let Some(cmd) = polled {
                    match cmd {
                        Command::Evict { key, slot } => {
                            let i = key.flat(ne);
                            assert!(!pinned[i], "evicted pinned {key}");
                            assert!(!running[i], "evicted {key} of the running layer");
                            assert_eq!(self.core.state(key), Some(State::Evicting(slot)));
                        }
                        Command::Load { key, slot, prefetch } => {
                            assert_eq!(self.core.state(key), Some(State::Loading(slot)));
                            // (a load right after an eviction was issued with it, earlier)
                            if prefetch && !self.after_evict {
                                assert_eq!(self.core.demand_queued(), 0, "a prefetch went before a demand load");
                                assert!(prefetch_ok, "a prefetch issued to a demand-only poll");
                            }
                        }
                    }
                    self.outstanding.push(cmd);
                }
                self.after_evict = after_evict;
            }
            Op::Complete { n, fail } => {
                if self.outstanding.is_empty() {
                    return;
                }
                match self.outstanding.remove(n % self.outstanding.len()) {
                    Command::Evict { key, .. } => self.core.evicted(key).unwrap(),
                    Command::Load { key, prefetch, .. } => {
                        let report = if fail { Err("disk gone".to_string()) } else { Ok(()) };
                        self.ok_loads += u64::from(!fail);
                        self.core.loaded(key, prefetch, report).unwrap();
                        if fail {
                            assert_eq!(self.core.state(key), Some(State::Home));
                        }
                    }
                }
            }
            Op::Pin(n) => {
                if self.used.is_empty() {
                    return;
                }
                let key = ExpertKey { layer: MoeLayerId(self.layer as u16), expert: self.used[n % self.used.len()] };
                if let Pin::Ready(slot) = self.core.pin(key, false).unwrap() {
                    assert_eq!(self.core.state(key), Some(State::Resident(slot)));
                    self.pins.push(key);
                }
            }
            Op::Unpin(n) => {
                if !self.pins.is_empty() {
                    let key = self.pins.remove(n % self.pins.len());
                    self.core.unpin(key).unwrap();
                }
            }
            Op::Layer(seeds) => {
                self.layer = (self.layer + 1) % self.s.layers;
                let mut ids = Vec::new();
                for (t, &seed) in seeds.iter().enumerate() {
                    // k distinct experts per token
                    for j in 0..k {
                        ids.push(ExpertId(((seed as usize + j) % ne) as u16));
                    }
                    if self.tokens.len() <= t {
                        self.tokens.push(StepToken { seq: SeqId(t as u64), token: seed as u32 });
                    }
                }
                let mut used = ids.clone();
                used.sort_unstable();
                used.dedup();
                let routing = LayerRouting {
                    layer: LayerId(self.layer as u16),
                    top_k: k,
                    weights: vec![1.0 / k as f32; ids.len()],
                    ids: ids.clone(),
                };
                let layer = MoeLayerId(self.layer as u16);
                self.core.prepare(layer, &routing, &used).unwrap();
                // look-ahead gating for the next layer, from the same choices
                if self.s.layers > 1 {
                    self.core.gating(layer, MoeLayerId(((self.layer + 1) % self.s.layers) as u16), &ids);
                }
                self.used = used;
            }
            Op::Step => {
                self.layer = self.s.layers - 1;
                self.used.clear();
                self.core.begin_step(&self.tokens);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_schedule_breaks_an_invariant(s in setup(), ops in prop::collection::vec(op(), 1..200)) {
        let slots = s.experts + s.extra_slots;
        let core = ResidencyCore::new(ResidencyConfig {
            layers: s.layers,
            experts: s.experts,
            top_k: s.top_k,
            slots,
            expert_bytes: 10,
            policy: s.policy,
            predictor: s.predictor.clone(),
            depth: 2,
            min_precision: 0.0,
        })
        .unwrap();
        let mut h = Harness {
            core,
            s: s.clone(),
            outstanding: Vec::new(),
            pins: Vec::new(),
            layer: s.layers - 1,
            used: Vec::new(),
            tokens: Vec::new(),
            ok_loads: 0,
            after_evict: false,
        };
        h.core.begin_step(&[]);
        for op in ops {
            h.apply(op);
            if let Err(e) = h.core.check() {
                panic!("invariant broken: {e}");
            }
            prop_assert!(h.core.occupied() <= slots);
        }
        // release every pin, finish everything in order: the core settles
        while let Some(key) = h.pins.pop() {
            h.core.unpin(key).unwrap();
        }
        for _ in 0..10_000 {
            if !h.outstanding.is_empty() {
                h.apply(Op::Complete { n: 0, fail: false });
            } else if let Some(cmd) = h.core.poll(true) {
                h.outstanding.push(cmd);
            } else {
                break;
            }
        }
        prop_assert!(h.outstanding.is_empty());
        h.core.check().unwrap();
        let st = h.core.stats();
        prop_assert_eq!(st.total().loads, h.ok_loads);
        prop_assert_eq!(st.total().bytes_loaded, 10 * h.ok_loads);
        prop_assert!(st.resident <= slots);
    }
}
