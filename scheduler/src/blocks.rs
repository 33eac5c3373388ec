//! Paged KV-cache bookkeeping.

use crate::SchedulerError;
use moe_types::BlockId;

/// The free list of a paged KV cache of `num_blocks` blocks of
/// `block_size` token slots each.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    /// Free ids; popped from the end, so the lowest ids go first.
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// A cache with every block free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Self { block_size, num_blocks, free }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks not held by any table.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take(&mut self, n: usize) -> Result<Vec<BlockId>, SchedulerError> {
        if n > self.free.len() {
            return Err(SchedulerError::OutOfBlocks { needed: n, free: self.free.len() });
        }
        let at = self.free.len() - n;
        let mut taken = self.free.split_off(at);
        taken.reverse();
        Ok(taken)
    }

    fn give_back(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            debug_assert!(b.index() < self.num_blocks && !self.free.contains(&b), "double free of block {b}");
            self.free.push(b);
        }
    }
}

/// The blocks one sequence holds, in logical order: token position `p` lives
/// in block `blocks[p / block_size]`, slot `p % block_size`.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    tokens: usize,
}

impl BlockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The physical blocks, in logical order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Token slots in use.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Blocks that growing to `tokens` slots would allocate.
    pub fn blocks_needed(&self, alloc: &BlockAllocator, tokens: usize) -> usize {
        alloc.blocks_for(tokens).saturating_sub(self.blocks.len())
    }

    /// Grows the table to `tokens` slots, allocating blocks as needed. On
    /// failure nothing is allocated.
    pub fn grow_to(&mut self, alloc: &mut BlockAllocator, tokens: usize) -> Result<(), SchedulerError> {
        let need = self.blocks_needed(alloc, tokens);
        let new = alloc.take(need)?;
        self.blocks.extend(new);
        self.tokens = self.tokens.max(tokens);
        Ok(())
    }

    /// Returns every block to the allocator, leaving the table empty.
    pub fn release(&mut self, alloc: &mut BlockAllocator) {
        alloc.give_back(self.blocks.drain(..));
        self.tokens = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn grows_by_blocks_and_releases_everything() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t = BlockTable::new();
        t.grow_to(&mut a, 1).unwrap();
        assert_eq!(t.blocks(), &[BlockId(0)]);
        t.grow_to(&mut a, 16).unwrap();
        assert_eq!(t.blocks().len(), 1);
        t.grow_to(&mut a, 17).unwrap();
        assert_eq!(t.blocks(), &[BlockId(0), BlockId(1)]);
        assert_eq!(a.num_free(), 2);
        t.release(&mut a);
        assert_eq!(a.num_free(), 4);
        assert_eq!(t.tokens(), 0);
    }

    #[test]
    fn exhaustion_allocates_nothing() {
        let mut a = BlockAllocator::new(3, 4);
        let mut t1 = BlockTable::new();
        let mut t2 = BlockTable::new();
        t1.grow_to(&mut a, 8).unwrap();
        let err = t2.grow_to(&mut a, 8).unwrap_err();
        assert_eq!(err, SchedulerError::OutOfBlocks { needed: 2, free: 1 });
        assert_eq!(a.num_free(), 1);
        assert!(t2.blocks().is_empty());
    }

    #[test]
    fn no_block_is_held_twice() {
        let mut a = BlockAllocator::new(64, 2);
        let mut tables: Vec<BlockTable> = (0..8).map(|_| BlockTable::new()).collect();
        // deterministic interleaving of grows and releases
        for step in 0..200usize {
            let i = (step * 7) % tables.len();
            if step % 5 == 4 {
                tables[i].release(&mut a);
            } else {
                let want = tables[i].tokens() + 1 + step % 3;
                let _ = tables[i].grow_to(&mut a, want);
            }
            let mut seen = HashSet::new();
            for t in &tables {
                for b in t.blocks() {
                    assert!(seen.insert(*b), "block {b} held twice");
                }
            }
            assert_eq!(seen.len() + a.num_free(), 64);
        }
    }
}
