//! GPU expert-slot pool: a fixed number of expert slots in device memory,
//! the slow tier in pinned (page-locked) host memory, and a copy stream so
//! loads overlap compute.
//!
//! **Untested on hardware**: this compiles and its bookkeeping
//! ([`moe_types::SlotTable`]) is tested on CPU, but no copy has run on a GPU
//! yet. `scripts/gpu-check.sh` exercises it (load, compute on the loaded
//! slot, compare with the CPU FFN) on a machine with one.
//!
//! Layout: one slot holds one expert's bf16 `gate_up` (`[2 * ffn, hidden]`)
//! followed by `down` (`[hidden, ffn]`), `3 * ffn * hidden` values. The host
//! tier holds every expert of the model in the same layout, at offset
//! `(layer * experts + expert) * slot_elems`.
//!
//! Synchronisation: each slot is its own `CudaSlice`, so cudarc's per-buffer
//! read/write events order the streams per slot: a kernel or product
//! reading slot A waits only for the last copy into A (not for copies into
//! other slots), and a copy into an evicted slot waits for the compute that
//! last read it. A separate `ready` event per slot answers "has it arrived?"
//! without blocking ([`ExpertSlotPool::is_ready`]), for prefetch accounting.
//! The logical-to-slot map is mirrored on the device ([`ExpertSlotPool::device_map`])
//! for kernels that look experts up themselves.
//!
//! Policy stays outside: the residency core (`moe_offload::residency`)
//! decides what to load, into which slot, and what to evict, exactly as on
//! CPU; this type moves bytes and mirrors the core's slot choices in its
//! table ([`ExpertSlotPool::load_into`]).

use super::context::GpuContext;
use super::error::{CudaError, CudaLibrary};
use super::gemm::{Bf16Matrix, ExpertMatrices};
use crate::{Weight, WeightData};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, PinnedHostSlice};
use moe_types::{ExpertKey, SlotId, SlotTable};
use std::sync::Arc;

/// Sizes of the pool.
#[derive(Clone, Copy, Debug)]
pub struct PoolShape {
    /// Model width.
    pub hidden: usize,
    /// Expert FFN width.
    pub ffn: usize,
    /// Layers (the host tier has room for every expert of every layer).
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Device slots.
    pub slots: usize,
}

impl PoolShape {
    /// bf16 values per expert.
    pub fn slot_elems(&self) -> usize {
        3 * self.ffn * self.hidden
    }
}

/// Device slots, pinned host tier and copy stream (see the module docs).
pub struct ExpertSlotPool {
    shape: PoolShape,
    table: SlotTable,
    slots: Vec<CudaSlice<u16>>,
    ready: Vec<Option<CudaEvent>>,
    host: PinnedHostSlice<u16>,
    copy: Arc<CudaStream>,
    map: CudaSlice<i32>,
    map_dirty: bool,
    /// Bytes copied host-to-device so far.
    bytes_loaded: u64,
}

impl ExpertSlotPool {
    /// Allocates `shape.slots` device slots and a pinned host tier for all
    /// `layers * experts` experts (zeroed; fill it with [`Self::stage`]).
    pub fn new(g: &GpuContext, shape: PoolShape) -> Result<Self, CudaError> {
        let n = shape.slot_elems();
        let total = shape.layers * shape.experts * n;
        let ctx = g.cuda();
        // SAFETY: the pinned buffer is written in full (zeroed) below before
        // anything reads it. Default flags (not write-combined) keep host reads
        // of it cheap, since `stage` and tests read it back.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u16>(total, 0)? };
        host.as_mut_slice()?.fill(0);
        let copy = ctx.new_stream()?;
        let slots = (0..shape.slots).map(|_| g.stream().alloc_zeros::<u16>(n)).collect::<Result<Vec<_>, _>>()?;
        let table = SlotTable::new(shape.slots, shape.layers, shape.experts);
        let map = g.stream().clone_htod(table.device_map())?;
        Ok(Self {
            shape,
            table,
            slots,
            ready: (0..shape.slots).map(|_| None).collect(),
            host,
            copy,
            map,
            map_dirty: false,
            bytes_loaded: 0,
        })
    }

    /// The pool's sizes.
    pub fn shape(&self) -> PoolShape {
        self.shape
    }

    /// Slot bookkeeping (read only).
    pub fn table(&self) -> &SlotTable {
        &self.table
    }

    /// Bytes copied host-to-device so far.
    pub fn bytes_loaded(&self) -> u64 {
        self.bytes_loaded
    }

    fn host_range(&self, k: ExpertKey) -> Result<std::ops::Range<usize>, CudaError> {
        if k.layer.index() >= self.shape.layers || k.expert.index() >= self.shape.experts {
            return Err(CudaError::Pool(format!("{k} is outside the pool")));
        }
        let n = self.shape.slot_elems();
        let start = k.flat(self.shape.experts) * n;
        Ok(start..start + n)
    }

    /// Copies one expert's weights into the pinned host tier, in bf16 (f32
    /// experts are rounded to nearest even: the slots hold bf16). Loading
    /// time, not the hot path: it first waits for every queued copy, since
    /// one may still be reading this expert's bytes.
    pub fn stage(&mut self, k: ExpertKey, gate_up: &Weight, down: &Weight) -> Result<(), CudaError> {
        let (h, f) = (self.shape.hidden, self.shape.ffn);
        if (gate_up.rows(), gate_up.cols(), down.rows(), down.cols()) != (2 * f, h, h, f) {
            return Err(CudaError::Pool(format!("expert {k:?}: shapes do not match hidden {h}, ffn {f}")));
        }
        let r = self.host_range(k)?;
        self.copy.synchronize()?;
        let host = &mut self.host.as_mut_slice()?[r];
        let (a, b) = host.split_at_mut(2 * f * h);
        for (w, dst) in [(gate_up, a), (down, b)] {
            match w.data() {
                WeightData::Bf16(bits) => dst.copy_from_slice(bits),
                WeightData::F32(v) => dst.iter_mut().zip(v).for_each(|(d, &x)| *d = half::bf16::from_f32(x).to_bits()),
                WeightData::Quant(q) => {
                    return Err(CudaError::Pool(format!(
                        "expert {k}: {} experts have no GPU kernel (the GPU tier holds bf16 and f32 experts)",
                        q.format().name()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Starts loading `k` from the host tier into the lowest free slot (see
    /// [`Self::load_into`]) and returns the slot.
    pub fn load(&mut self, k: ExpertKey) -> Result<SlotId, CudaError> {
        let slot = self.table.first_free().ok_or_else(|| CudaError::Pool("every slot is occupied".into()))?;
        self.load_into(k, slot)?;
        Ok(slot)
    }

    /// Starts loading `k` from the host tier into the free slot `slot` (the
    /// residency core's `Command::Load`) on the copy stream; compute that
    /// later reads the slot waits for the copy (per-slot events), nothing on
    /// the host blocks.
    pub fn load_into(&mut self, k: ExpertKey, slot: SlotId) -> Result<(), CudaError> {
        let r = self.host_range(k)?;
        self.table.place(k, slot).map_err(|e| CudaError::Pool(e.to_string()))?;
        let i = slot.index();
        // The copy reads pinned memory asynchronously: `stage` waits for the
        // copy stream before writing, and the pool owns the buffer, so the
        // bytes stay put until the copy has run.
        let src = &self.host.as_slice()?[r];
        let res = self.copy.memcpy_htod(src, &mut self.slots[i]);
        if let Err(e) = res {
            let _ = self.table.evict(k);
            return Err(e.into());
        }
        self.ready[i] = Some(self.copy.record_event(None)?);
        self.bytes_loaded += (src.len() * 2) as u64;
        self.map_dirty = true;
        Ok(())
    }

    /// Frees the slot of `k` (the policy's decision). A later copy into the
    /// slot waits for compute that read it (per-slot events).
    pub fn evict(&mut self, k: ExpertKey) -> Result<SlotId, CudaError> {
        let slot = self.table.evict(k).map_err(|e| CudaError::Pool(e.to_string()))?;
        self.ready[slot.0 as usize] = None;
        self.map_dirty = true;
        Ok(slot)
    }

    /// Whether `k` is resident and its copy has finished (non-blocking).
    pub fn is_ready(&self, k: ExpertKey) -> Result<bool, CudaError> {
        let Some(slot) = self.table.slot_of(k) else { return Ok(false) };
        match &self.ready[slot.0 as usize] {
            Some(ev) => Ok(ev.try_is_complete()?),
            None => Ok(false),
        }
    }

    /// Makes the compute stream wait (on the device) for `k`'s copy.
    pub fn wait_ready(&self, g: &GpuContext, k: ExpertKey) -> Result<(), CudaError> {
        let slot = self.table.slot_of(k).ok_or_else(|| CudaError::Pool(format!("{k} is not resident")))?;
        if let Some(ev) = &self.ready[slot.0 as usize] {
            g.stream().wait(ev)?;
        }
        Ok(())
    }

    /// Views of `k`'s matrices in its slot, for [`super::gemm::expert_ffn`]:
    /// `(gate_up, down)` as device views.
    pub fn views(&self, k: ExpertKey) -> Result<(CudaView<'_, u16>, CudaView<'_, u16>), CudaError> {
        let slot = self.table.slot_of(k).ok_or_else(|| CudaError::Pool(format!("{k} is not resident")))?;
        let s = &self.slots[slot.0 as usize];
        let split = 2 * self.shape.ffn * self.shape.hidden;
        Ok((s.slice(..split), s.slice(split..)))
    }

    /// The matrices of a slot's two views (see [`Self::views`]).
    pub fn matrices<'a>(&self, views: &'a (CudaView<'a, u16>, CudaView<'a, u16>)) -> ExpertMatrices<'a> {
        let (h, f) = (self.shape.hidden, self.shape.ffn);
        ExpertMatrices {
            gate_up: Bf16Matrix { bits: &views.0, rows: 2 * f, cols: h },
            down: Bf16Matrix { bits: &views.1, rows: h, cols: f },
        }
    }

    /// The device copy of the logical-to-slot map (`layer * experts +
    /// expert` -> slot or -1), refreshed on the compute stream if loads or
    /// evictions changed it.
    pub fn device_map(&mut self, g: &GpuContext) -> Result<&CudaSlice<i32>, CudaError> {
        if self.map_dirty {
            g.stream().memcpy_htod(self.table.device_map(), &mut self.map)?;
            self.map_dirty = false;
        }
        Ok(&self.map)
    }

    /// Waits until every queued copy has finished.
    pub fn synchronize_copies(&self) -> Result<(), CudaError> {
        Ok(self.copy.synchronize()?)
    }
}

impl Drop for ExpertSlotPool {
    /// Copies still queued read the pinned tier: they finish before it is freed.
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
    }
}

/// Measures host-to-device bandwidth from pinned memory on a separate copy
/// stream: `bytes` per copy, best of `repeats`, in GB/s (10^9 bytes/s).
pub fn pinned_h2d_bandwidth(g: &GpuContext, bytes: usize, repeats: usize) -> Result<f64, CudaError> {
    super::context::require(CudaLibrary::Driver)?;
    let ctx = g.cuda();
    let n = bytes / 4;
    // SAFETY: the buffer is filled before use.
    let mut host = unsafe { ctx.alloc_pinned_with_flags::<u32>(n, 0)? };
    host.as_mut_slice()?.iter_mut().enumerate().for_each(|(i, v)| *v = i as u32);
    let copy = ctx.new_stream()?;
    let mut dev = copy.alloc_zeros::<u32>(n)?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        let start = copy.record_event(timing)?;
        copy.memcpy_htod(&host, &mut dev)?;
        let end = copy.record_event(timing)?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)? as f64;
        if ms > 0.0 {
            best = best.max((n * 4) as f64 / (ms * 1e-3) / 1e9);
        }
    }
    Ok(best)
}
