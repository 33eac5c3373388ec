//! Host-side addressing of one forward step, shared by the CPU forward pass
//! and the GPU one (which uploads it): which logits rows a step returns, and
//! per token its position, its KV-cache row and where its sequence's block
//! table starts in the step's flat block list. Pure functions of the chunks,
//! so they are tested here without a device.

use crate::forward::{LogitRow, LogitsRequest, SeqChunk};

/// The rows a step returns logits for: `(token index in the batch, origin)`,
/// in batch order.
pub(crate) fn logit_rows(chunks: &[SeqChunk<'_>]) -> Vec<(usize, LogitRow)> {
    let mut rows = Vec::new();
    let mut first = 0;
    for (c, ch) in chunks.iter().enumerate() {
        let n = ch.tokens.len();
        let pick = match ch.logits {
            LogitsRequest::None => 0..0,
            LogitsRequest::Last => n - 1..n,
            LogitsRequest::All => 0..n,
        };
        rows.extend(pick.map(|i| (first + i, LogitRow { chunk: c, pos: ch.start_pos + i })));
        first += n;
    }
    rows
}

/// Per-token addressing of a step over a paged cache of `block_size` slots
/// per block, as 32-bit values ready for the device kernels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepLayout {
    /// Per token: its id.
    pub ids: Vec<u32>,
    /// Per token: its position in its sequence.
    pub pos: Vec<i32>,
    /// Per token: the cache row its key and value go to.
    pub slots: Vec<i32>,
    /// Every chunk's block table (the blocks covering its positions), concatenated.
    pub blocks: Vec<i32>,
    /// Per token: where its sequence's table starts in `blocks`.
    pub block_off: Vec<i32>,
}

/// A step too large for the kernels' 32-bit indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutTooLarge;

impl StepLayout {
    /// The layout of `chunks` (already validated: every chunk's blocks
    /// cover its positions).
    pub fn new(chunks: &[SeqChunk<'_>], block_size: usize) -> Result<Self, LayoutTooLarge> {
        let mut l = Self::default();
        l.fill(chunks, block_size)?;
        Ok(l)
    }

    /// [`Self::new`] into this layout's buffers (steady-state steps do not allocate).
    pub fn fill(&mut self, chunks: &[SeqChunk<'_>], block_size: usize) -> Result<(), LayoutTooLarge> {
        let i32_of = |v: usize| i32::try_from(v).map_err(|_| LayoutTooLarge);
        let l = self;
        l.ids.clear();
        l.pos.clear();
        l.slots.clear();
        l.blocks.clear();
        l.block_off.clear();
        for ch in chunks {
            let end = ch.start_pos + ch.tokens.len();
            let off = i32_of(l.blocks.len())?;
            for b in &ch.blocks[..end.div_ceil(block_size)] {
                l.blocks.push(i32_of(b.index())?);
            }
            for (i, &id) in ch.tokens.iter().enumerate() {
                let pos = ch.start_pos + i;
                l.ids.push(id);
                l.pos.push(i32_of(pos)?);
                l.slots.push(i32_of(ch.blocks[pos / block_size].index() * block_size + pos % block_size)?);
                l.block_off.push(off);
            }
        }
        Ok(())
    }

    /// Tokens in the step.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the step has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_types::BlockId;

    fn chunk<'a>(tokens: &'a [u32], start_pos: usize, blocks: &'a [BlockId], logits: LogitsRequest) -> SeqChunk<'a> {
        SeqChunk { tokens, start_pos, blocks, logits }
    }

    #[test]
    fn rows_slots_and_tables_address_each_token() {
        let (b0, b1) = ([BlockId(3), BlockId(0), BlockId(7)], [BlockId(5)]);
        let (prefill, decode) = ([1u32, 2, 3, 4, 5], [9u32]);
        // a prefill chunk continuing at position 3 (crossing a block of 4), and a decode
        let chunks = [chunk(&prefill, 3, &b0, LogitsRequest::Last), chunk(&decode, 2, &b1, LogitsRequest::All)];
        let l = StepLayout::new(&chunks, 4).unwrap();
        assert_eq!(l.ids, vec![1, 2, 3, 4, 5, 9]);
        assert_eq!(l.pos, vec![3, 4, 5, 6, 7, 2]);
        // position p of chunk 0 lives in block b0[p / 4], slot p % 4
        assert_eq!(l.slots, vec![3 * 4 + 3, 0, 1, 2, 3, 5 * 4 + 2]);
        assert_eq!(l.blocks, vec![3, 0, 5]);
        assert_eq!(l.block_off, vec![0, 0, 0, 0, 0, 2]);
        // every token's table entry for its own position is the block holding its slot
        for t in 0..l.len() {
            let p = l.pos[t] as usize;
            let b = l.blocks[l.block_off[t] as usize + p / 4];
            assert_eq!(b * 4 + (p % 4) as i32, l.slots[t]);
        }
        let rows = logit_rows(&chunks);
        assert_eq!(rows, vec![(4, LogitRow { chunk: 0, pos: 7 }), (5, LogitRow { chunk: 1, pos: 2 })]);
    }

    #[test]
    fn prefill_chunks_without_logits_return_no_rows() {
        let blocks = [BlockId(0)];
        let t = [1u32, 2];
        assert!(logit_rows(&[chunk(&t, 0, &blocks, LogitsRequest::None)]).is_empty());
        let all = logit_rows(&[chunk(&t, 0, &blocks, LogitsRequest::All)]);
        assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1]);
    }
}
