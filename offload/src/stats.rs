//! Counters of the expert cache, per MoE layer.

/// What happened at one MoE layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStats {
    /// Experts resident when the layer needed them.
    pub hits: u64,
    /// Experts not resident when needed.
    pub misses: u64,
    /// Of the misses, experts already being loaded by a prefetch (late).
    pub late: u64,
    /// Prefetch loads started.
    pub prefetch_issued: u64,
    /// Prefetched experts used before eviction.
    pub prefetch_used: u64,
    /// Prefetched experts evicted unused.
    pub prefetch_wasted: u64,
    /// Loads completed (demand and prefetch).
    pub loads: u64,
    /// Bytes read from the slow tier.
    pub bytes_loaded: u64,
    /// Nanoseconds spent waiting for this layer's experts.
    pub stall_ns: u64,
    /// Predicted (token, expert) choices that were right.
    pub predicted_right: u64,
    /// Predicted (token, expert) choices.
    pub predicted: u64,
    /// Actual (token, expert) choices.
    pub actual: u64,
}

impl LayerStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &LayerStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.late += o.late;
        self.prefetch_issued += o.prefetch_issued;
        self.prefetch_used += o.prefetch_used;
        self.prefetch_wasted += o.prefetch_wasted;
        self.loads += o.loads;
        self.bytes_loaded += o.bytes_loaded;
        self.stall_ns += o.stall_ns;
        self.predicted_right += o.predicted_right;
        self.predicted += o.predicted;
        self.actual += o.actual;
    }

    /// Hits / (hits + misses), at the time of need.
    pub fn hit_ratio(&self) -> f64 {
        ratio(self.hits, self.hits + self.misses)
    }

    /// Correct / predicted choices.
    pub fn precision(&self) -> f64 {
        ratio(self.predicted_right, self.predicted)
    }

    /// Correct / actual choices.
    pub fn recall(&self) -> f64 {
        ratio(self.predicted_right, self.actual)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A snapshot of the cache's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheStats {
    /// Per MoE layer, in layer order.
    pub layers: Vec<LayerStats>,
    /// Fast-tier slots.
    pub slots: usize,
    /// Experts resident now.
    pub resident: usize,
    /// Loads that failed.
    pub load_failures: u64,
    /// Per MoE layer and distance (`[layer][d - 1]`, d = MoE layers ahead the
    /// forecast was made): (experts predicted, of them used).
    pub by_distance: Vec<Vec<(u64, u64)>>,
}

impl CacheStats {
    /// All layers summed.
    pub fn total(&self) -> LayerStats {
        let mut t = LayerStats::default();
        self.layers.iter().for_each(|l| t.add(l));
        t
    }
}

/// Publishes a residency core's counters to the metrics registry: what
/// changed since the last call (one per fast tier: the CPU cache, the GPU tier).
pub(crate) struct Publisher {
    published: Vec<LayerStats>,
    failures: u64,
}

impl Publisher {
    /// Nothing published yet for `layers` MoE layers.
    pub(crate) fn new(layers: usize) -> Self {
        Self { published: vec![LayerStats::default(); layers], failures: 0 }
    }

    /// Publishes what changed in `core`'s counters since the last call.
    pub(crate) fn publish(&mut self, core: &crate::residency::ResidencyCore) {
        use crate::metric_names as m;
        for (l, (now, was)) in core.stats_per_layer().iter().zip(self.published.iter_mut()).enumerate() {
            if now == was {
                continue;
            }
            let label = l.to_string();
            let delta = |a: u64, b: u64| a.saturating_sub(b);
            metrics::counter!(m::HITS, "layer" => label.clone()).increment(delta(now.hits, was.hits));
            metrics::counter!(m::MISSES, "layer" => label.clone()).increment(delta(now.misses, was.misses));
            metrics::counter!(m::PREFETCH_ISSUED, "layer" => label.clone())
                .increment(delta(now.prefetch_issued, was.prefetch_issued));
            metrics::counter!(m::PREFETCH_USED, "layer" => label.clone())
                .increment(delta(now.prefetch_used, was.prefetch_used));
            metrics::counter!(m::PREFETCH_WASTED, "layer" => label.clone())
                .increment(delta(now.prefetch_wasted, was.prefetch_wasted));
            metrics::counter!(m::BYTES_LOADED).increment(delta(now.bytes_loaded, was.bytes_loaded));
            metrics::counter!(m::STALL_MICROSECONDS).increment(delta(now.stall_ns / 1000, was.stall_ns / 1000));
            if now.actual != was.actual {
                metrics::gauge!(m::PREDICTOR_PRECISION, "layer" => label.clone()).set(now.precision());
                metrics::gauge!(m::PREDICTOR_RECALL, "layer" => label).set(now.recall());
            }
            *was = now.clone();
        }
        let failures = core.load_failures();
        if failures != self.failures {
            metrics::counter!(m::LOAD_FAILURES).increment(failures - self.failures);
            self.failures = failures;
        }
        metrics::gauge!(m::RESIDENT).set(core.occupied() as f64);
        metrics::gauge!(m::RESIDENT_BYTES).set(core.occupied_bytes() as f64);
    }
}
