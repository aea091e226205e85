//! The caching allocator: segments from a `MemorySource`, carved into blocks, cached on free.
//!
//! Layout of the state:
//! - `nodes`: every block (allocated or free) of every segment, in a table indexed by u32, linked to its
//!   address neighbours inside its segment (prev/next) so frees can merge in O(1).
//! - `pools[owner]`: the free blocks, sorted for best fit. Owner 0 holds blocks any stream may take;
//!   owner s+1 holds blocks freed on stream slot s, which only that stream may take until an event
//!   recorded after the free has completed.
//! - `streams`: per stream, a counter of frees (`next_seq`) and at most one event in flight covering all
//!   frees with a smaller sequence number (`covered_seq`).
//!
//! Cross-stream events are recorded lazily: a free on stream S costs no driver call; only when another
//! stream misses in its pools does the allocator record one event on S covering every free so far. This
//! keeps the hot path (a cached alloc+free on one stream) free of driver calls, locks apart.

use crate::error::AllocError;
use crate::oom::OomReport;
use crate::pool::{Pool, PoolEntry};
use crate::sizes::{
    block_size_for, oversize_allows, pool_kind_for, segment_size_for, should_split, AllocatorConfig, PoolKind,
};
use crate::source::{MemorySource, SourceError, StreamId};
use crate::stats::{AllocatorStats, Counters};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

const NONE: u32 = u32::MAX;
/// Owner index of the pool every stream may take from.
const ANY: usize = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    /// A slot of the node table not in use (on `free_nodes`).
    Unused,
    Free,
    Allocated,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    addr: u64,
    size: usize,
    kind: PoolKind,
    segment: u32,
    prev: u32,
    next: u32,
    state: NodeState,
    /// Allocated: the stream's owner index. Free: the pool owner (ANY or a stream's owner index).
    owner: usize,
    /// Free and stream-owned: the stream's free counter at the free (merges keep the larger).
    seq: u64,
    /// Allocated: bytes the caller asked for.
    requested: usize,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: u64,
    size: usize,
    kind: PoolKind,
    /// The block at the segment's start.
    first: u32,
    live: bool,
}

#[derive(Debug, Default)]
struct OwnerPools {
    small: Pool,
    large: Pool,
}

impl OwnerPools {
    fn get(&self, kind: PoolKind) -> &Pool {
        match kind {
            PoolKind::Small => &self.small,
            PoolKind::Large => &self.large,
        }
    }
    fn get_mut(&mut self, kind: PoolKind) -> &mut Pool {
        match kind {
            PoolKind::Small => &mut self.small,
            PoolKind::Large => &mut self.large,
        }
    }
    fn is_empty(&self) -> bool {
        self.small.is_empty() && self.large.is_empty()
    }
}

struct StreamState<E> {
    id: StreamId,
    /// Sequence number the next free on this stream gets.
    next_seq: u64,
    /// Frees with a smaller sequence number are covered by the event in flight (or by one completed).
    covered_seq: u64,
    in_flight: Option<E>,
}

/// A block handed out by the allocator. Not `Clone`: giving it back to `free` consumes it, so a block
/// cannot be freed twice.
#[must_use = "a DeviceBlock must be given back with free(), or its memory stays allocated"]
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceBlock {
    addr: u64,
    size: usize,
    requested: usize,
    node: u32,
    stream: StreamId,
    /// Which allocator handed it out (a block given to the wrong allocator is caught, not merged).
    allocator_id: u32,
}

impl DeviceBlock {
    /// The device address (512-byte aligned).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// The usable size: the request rounded up to 512 bytes (or a bit more when a remainder was too small
    /// to keep).
    pub fn size(&self) -> usize {
        self.size
    }
    /// The size that was asked for.
    pub fn requested(&self) -> usize {
        self.requested
    }
    /// The stream the block was allocated on (and, with `free`, is freed on).
    pub fn stream(&self) -> StreamId {
        self.stream
    }
}

/// What a block of a segment is doing, as reported by `snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Allocated {
        stream: StreamId,
    },
    /// Cached. `owner` None: any stream may take it; Some(s): only stream s, until `waiting` (an event
    /// covering the free is in flight) turns into completion.
    Free {
        owner: Option<StreamId>,
        waiting: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSnapshot {
    pub addr: u64,
    pub size: usize,
    pub state: BlockState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSnapshot {
    pub addr: u64,
    pub size: usize,
    pub kind: PoolKind,
    /// The segment's blocks in address order.
    pub blocks: Vec<BlockSnapshot>,
}

/// A caching allocator over a raw memory source. All methods take `&self`; one mutex guards the state.
pub struct CachingAllocator<S: MemorySource> {
    inner: Mutex<Inner<S>>,
}

/// Ids of allocator instances, so each checks its blocks come back to it.
static NEXT_ALLOCATOR_ID: AtomicU32 = AtomicU32::new(1);

struct Inner<S: MemorySource> {
    id: u32,
    source: S,
    config: AllocatorConfig,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    segments: Vec<Segment>,
    free_segments: Vec<u32>,
    pools: Vec<OwnerPools>,
    streams: Vec<StreamState<S::Event>>,
    spare_events: Vec<S::Event>,
    counters: Counters,
    /// Reused buffer for the blocks moved when an event completes.
    scratch: Vec<u32>,
}

impl<S: MemorySource> CachingAllocator<S> {
    pub fn new(source: S, config: AllocatorConfig) -> Result<Self, AllocError> {
        config.validate()?;
        let inner = Inner {
            id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
            source,
            config,
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            segments: Vec::new(),
            free_segments: Vec::new(),
            pools: vec![OwnerPools::default()],
            streams: Vec::new(),
            spare_events: Vec::new(),
            counters: Counters::default(),
            scratch: Vec::new(),
        };
        Ok(CachingAllocator {
            inner: Mutex::new(inner),
        })
    }

    /// A block of at least `bytes` bytes for work on `stream`. Never waits for the device; on a full
    /// device it frees the cache (waiting for queued frees to finish) and retries once before failing.
    pub fn allocate(&self, bytes: usize, stream: StreamId) -> Result<DeviceBlock, AllocError> {
        self.inner.lock().allocate(bytes, stream)
    }

    /// Give a block back, freed on the stream it was allocated on: that stream may reuse it at once.
    pub fn free(&self, block: DeviceBlock) {
        let stream = block.stream;
        self.inner.lock().free(block, stream)
    }

    /// Give a block back, freed on `stream` (the caller has ordered all work using the block before this
    /// point of `stream`, e.g. by making it wait on the block's other streams).
    pub fn free_on_stream(&self, block: DeviceBlock, stream: StreamId) {
        self.inner.lock().free(block, stream)
    }

    /// Poll the events in flight and hand the blocks they cover to every stream. Never blocks.
    pub fn process_events(&self) -> Result<(), AllocError> {
        self.inner.lock().poll_events().map(|_| ())
    }

    /// Give every segment with no allocated block back to the source. Waits (on the host) for the events
    /// covering cached frees, so queued work can no longer touch what is released.
    pub fn empty_cache(&self) -> Result<(), AllocError> {
        self.inner.lock().flush()
    }

    pub fn stats(&self) -> AllocatorStats {
        self.inner.lock().stats()
    }

    /// Start the peaks again from the current values (e.g. after warmup).
    pub fn reset_peak(&self) {
        self.inner.lock().counters.reset_peaks()
    }

    /// A few lines for logs: sizes, peaks, counts and fragmentation.
    pub fn summary(&self) -> String {
        let inner = self.inner.lock();
        let name = inner.source.name();
        inner.stats().summary(&name)
    }

    pub fn config(&self) -> AllocatorConfig {
        self.inner.lock().config
    }

    /// Every segment and its blocks, in address order (allocates; for tests and debugging).
    pub fn snapshot(&self) -> Vec<SegmentSnapshot> {
        self.inner.lock().snapshot()
    }

    /// Check the internal structure (block links, pools, counters); Err says what is broken.
    /// For tests: O(blocks x pool size).
    pub fn check_consistency(&self) -> Result<(), String> {
        self.inner.lock().check_consistency()
    }

    /// Run `f` on the source while holding the allocator's lock (tests use it to complete host events).
    pub fn with_source<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.inner.lock().source)
    }
}

impl<S: MemorySource> Inner<S> {
    fn allocate(&mut self, bytes: usize, stream: StreamId) -> Result<DeviceBlock, AllocError> {
        if !self.config.caching {
            return self.allocate_uncached(bytes, stream);
        }
        let size = block_size_for(bytes)?;
        let kind = pool_kind_for(size);
        let owner = self.owner_of(stream);
        if let Some(node) = self.take_free_block(owner, kind, size) {
            return Ok(self.hand_out(node, size, bytes, owner));
        }
        // A miss: blocks other streams freed may be ours once their events complete.
        if self.reclaim_for(owner)? {
            if let Some(node) = self.take_free_block(owner, kind, size) {
                return Ok(self.hand_out(node, size, bytes, owner));
            }
        }
        let segment_size = segment_size_for(size)?;
        match self.new_segment(segment_size, kind, owner) {
            Ok(node) => return Ok(self.hand_out(node, size, bytes, owner)),
            Err(SourceError::OutOfMemory) => {}
            Err(error) => return Err(source_error(format!("allocating a {segment_size}-byte segment"), error)),
        }
        // The device is full: give back every unused cached segment and try once more.
        self.flush()?;
        if let Some(node) = self.take_free_block(owner, kind, size) {
            return Ok(self.hand_out(node, size, bytes, owner));
        }
        match self.new_segment(segment_size, kind, owner) {
            Ok(node) => Ok(self.hand_out(node, size, bytes, owner)),
            Err(SourceError::OutOfMemory) => {
                self.counters.num_ooms += 1;
                Err(AllocError::OutOfMemory(Box::new(self.oom_report(
                    bytes,
                    size,
                    segment_size,
                    stream,
                ))))
            }
            Err(error) => Err(source_error(format!("allocating a {segment_size}-byte segment"), error)),
        }
    }

    /// No-caching mode: a segment of exactly the requested bytes (at least 1), so the source's memory
    /// checks see where the tensor ends. Nothing is cached, so there is nothing to flush before failing.
    fn allocate_uncached(&mut self, bytes: usize, stream: StreamId) -> Result<DeviceBlock, AllocError> {
        let size = bytes.max(1);
        let kind = pool_kind_for(size);
        let owner = self.owner_of(stream);
        match self.new_segment(size, kind, owner) {
            // The block is the whole segment: hand_out never splits a block of exactly the size asked for.
            Ok(node) => Ok(self.hand_out(node, size, bytes, owner)),
            Err(SourceError::OutOfMemory) => {
                self.counters.num_ooms += 1;
                Err(AllocError::OutOfMemory(Box::new(
                    self.oom_report(bytes, size, size, stream),
                )))
            }
            Err(error) => Err(source_error(format!("allocating {size} bytes (no caching)"), error)),
        }
    }

    /// No-caching mode: wait (on the host) until `stream` has run everything queued before this free, then
    /// give the block's segment back to the source, so work queued after the free that still touches it is
    /// a use after free the memory checker reports. `free` cannot return an error; a driver failure here
    /// (the context is already broken) is reported on stderr.
    fn free_uncached(&mut self, idx: u32, stream: StreamId) {
        let n = self.nodes[idx as usize];
        let sg = self.segments[n.segment as usize];
        debug_assert!(
            sg.addr == n.addr && sg.size == n.size,
            "an uncached block is its whole segment"
        );
        let slot = self.owner_of(stream) - 1;
        let waited = self
            .record_event(slot, true)
            .and_then(|()| self.wait_and_complete(slot));
        let released = waited.and_then(|()| {
            self.source
                .release(sg.addr, sg.size)
                .map_err(|e| source_error(format!("giving back {} bytes (no caching)", sg.size), e))
        });
        if let Err(e) = released {
            eprintln!(
                "warning: {}: freeing the block at {:#x} ({} bytes) failed, its memory stays with the driver: {e}",
                self.source.name(),
                sg.addr,
                sg.size
            );
        }
        self.drop_node(idx);
        self.segments[n.segment as usize].live = false;
        self.free_segments.push(n.segment);
        let c = &mut self.counters;
        c.allocated_bytes -= n.size;
        c.requested_bytes -= n.requested;
        c.num_frees += 1;
        c.reserved_bytes -= sg.size;
        c.num_segment_frees += 1;
        match sg.kind {
            PoolKind::Small => c.segments_small -= 1,
            PoolKind::Large => c.segments_large -= 1,
        }
    }

    fn free(&mut self, block: DeviceBlock, stream: StreamId) {
        let idx = block.node;
        let node = self.nodes.get(idx as usize).copied();
        match node {
            Some(n)
                if block.allocator_id == self.id
                    && n.state == NodeState::Allocated
                    && n.addr == block.addr
                    && n.size == block.size => {}
            _ => panic!(
                "free of a block this allocator did not hand out (addr {:#x})",
                block.addr
            ),
        }
        if !self.config.caching {
            return self.free_uncached(idx, stream);
        }
        let owner = self.owner_of(stream);
        let n = &mut self.nodes[idx as usize];
        self.counters.allocated_bytes -= n.size;
        self.counters.requested_bytes -= n.requested;
        self.counters.num_frees += 1;
        let stream_state = &mut self.streams[owner - 1];
        n.state = NodeState::Free;
        n.owner = owner;
        n.seq = stream_state.next_seq;
        n.requested = 0;
        stream_state.next_seq += 1;
        let merged = self.merge_with_free_neighbours(idx);
        self.pool_insert(merged);
    }

    /// The owner index of `stream`, registering it on first sight (the only growth, once per stream).
    fn owner_of(&mut self, stream: StreamId) -> usize {
        if let Some(i) = self.streams.iter().position(|s| s.id == stream) {
            return i + 1;
        }
        self.streams.push(StreamState {
            id: stream,
            next_seq: 0,
            covered_seq: 0,
            in_flight: None,
        });
        self.pools.push(OwnerPools::default());
        self.streams.len()
    }

    fn is_waiting(&self, owner: usize, seq: u64) -> bool {
        owner != ANY && seq < self.streams[owner - 1].covered_seq
    }

    fn pool_insert(&mut self, idx: u32) {
        let n = self.nodes[idx as usize];
        debug_assert_eq!(n.state, NodeState::Free);
        self.pools[n.owner].get_mut(n.kind).insert(PoolEntry {
            size: n.size,
            addr: n.addr,
            node: idx,
        });
        if self.is_waiting(n.owner, n.seq) {
            self.counters.waiting_bytes += n.size;
        }
    }

    fn pool_remove(&mut self, idx: u32) {
        let n = self.nodes[idx as usize];
        let found = self.pools[n.owner].get_mut(n.kind).remove(n.size, n.addr);
        assert!(found, "free block {:#x} missing from its pool", n.addr);
        if self.is_waiting(n.owner, n.seq) {
            self.counters.waiting_bytes -= n.size;
        }
    }

    /// Best fit for `size` among the blocks `owner` may take (its own, and those free for any stream),
    /// removed from its pool.
    fn take_free_block(&mut self, owner: usize, kind: PoolKind, size: usize) -> Option<u32> {
        let max_split = self.config.max_split_size;
        let candidate = |pool: &Pool| {
            pool.best_fit_index(size)
                .filter(|&i| oversize_allows(pool.entries()[i].size, size, max_split))
                .map(|i| (pool.entries()[i].size, i))
        };
        let own = candidate(self.pools[owner].get(kind));
        let any = if owner == ANY {
            None
        } else {
            candidate(self.pools[ANY].get(kind))
        };
        // The smaller of the two fits; the stream's own block on a tie.
        let (from, at) = match (own, any) {
            (Some((own_size, i)), Some((any_size, j))) => {
                if any_size < own_size {
                    (ANY, j)
                } else {
                    (owner, i)
                }
            }
            (Some((_, i)), None) => (owner, i),
            (None, Some((_, j))) => (ANY, j),
            (None, None) => return None,
        };
        // Removed by index: no second search on the hot path.
        let entry = self.pools[from].get_mut(kind).remove_at(at);
        let n = self.nodes[entry.node as usize];
        if self.is_waiting(n.owner, n.seq) {
            self.counters.waiting_bytes -= n.size;
        }
        Some(entry.node)
    }

    /// Mark a free block (already out of its pool) allocated, splitting off a remainder worth keeping.
    fn hand_out(&mut self, idx: u32, size: usize, requested: usize, owner: usize) -> DeviceBlock {
        let n = self.nodes[idx as usize];
        if should_split(n.size, size, n.kind, self.config.max_split_size) {
            let rest = self.new_node(Node {
                addr: n.addr + size as u64,
                size: n.size - size,
                kind: n.kind,
                segment: n.segment,
                prev: idx,
                next: n.next,
                state: NodeState::Free,
                owner: n.owner,
                seq: n.seq,
                requested: 0,
            });
            if n.next != NONE {
                self.nodes[n.next as usize].prev = rest;
            }
            let node = &mut self.nodes[idx as usize];
            node.next = rest;
            node.size = size;
            self.pool_insert(rest);
        }
        let node = &mut self.nodes[idx as usize];
        node.state = NodeState::Allocated;
        node.owner = owner;
        node.requested = requested;
        let block_size = node.size;
        let addr = node.addr;
        let c = &mut self.counters;
        c.allocated_bytes += block_size;
        c.requested_bytes += requested;
        c.num_allocs += 1;
        c.update_peaks();
        DeviceBlock {
            addr,
            size: block_size,
            requested,
            node: idx,
            stream: self.streams[owner - 1].id,
            allocator_id: self.id,
        }
    }

    fn new_node(&mut self, node: Node) -> u32 {
        match self.free_nodes.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).expect("more than 4 billion blocks")
            }
        }
    }

    fn drop_node(&mut self, idx: u32) {
        self.nodes[idx as usize].state = NodeState::Unused;
        self.free_nodes.push(idx);
    }

    /// Merge a free block (not in a pool) with its address neighbours that are free for the same owner;
    /// returns the surviving node, not yet in a pool.
    fn merge_with_free_neighbours(&mut self, idx: u32) -> u32 {
        let n = self.nodes[idx as usize];
        let mergeable = |this: &Self, j: u32| {
            j != NONE && this.nodes[j as usize].state == NodeState::Free && this.nodes[j as usize].owner == n.owner
        };
        if mergeable(self, n.prev) {
            let p = self.nodes[n.prev as usize];
            self.pool_remove(n.prev);
            let node = &mut self.nodes[idx as usize];
            node.addr = p.addr;
            node.size += p.size;
            node.prev = p.prev;
            node.seq = node.seq.max(p.seq);
            if p.prev != NONE {
                self.nodes[p.prev as usize].next = idx;
            } else {
                self.segments[n.segment as usize].first = idx;
            }
            self.drop_node(n.prev);
        }
        let next = self.nodes[idx as usize].next;
        if mergeable(self, next) {
            let q = self.nodes[next as usize];
            self.pool_remove(next);
            let node = &mut self.nodes[idx as usize];
            node.size += q.size;
            node.next = q.next;
            node.seq = node.seq.max(q.seq);
            if q.next != NONE {
                self.nodes[q.next as usize].prev = idx;
            }
            self.drop_node(next);
        }
        idx
    }

    /// A new segment from the source, as one free block owned by `owner` (not in a pool).
    fn new_segment(&mut self, size: usize, kind: PoolKind, owner: usize) -> Result<u32, SourceError> {
        let addr = self.source.allocate(size)?;
        let seg = match self.free_segments.pop() {
            Some(s) => s,
            None => {
                self.segments.push(Segment {
                    addr: 0,
                    size: 0,
                    kind,
                    first: NONE,
                    live: false,
                });
                u32::try_from(self.segments.len() - 1).expect("more than 4 billion segments")
            }
        };
        // Fresh memory counts as freed on the allocating stream, so it merges with that stream's frees.
        let stream_state = &mut self.streams[owner - 1];
        let seq = stream_state.next_seq;
        stream_state.next_seq += 1;
        let node = self.new_node(Node {
            addr,
            size,
            kind,
            segment: seg,
            prev: NONE,
            next: NONE,
            state: NodeState::Free,
            owner,
            seq,
            requested: 0,
        });
        self.segments[seg as usize] = Segment {
            addr,
            size,
            kind,
            first: node,
            live: true,
        };
        let c = &mut self.counters;
        c.reserved_bytes += size;
        c.num_segment_allocs += 1;
        match kind {
            PoolKind::Small => c.segments_small += 1,
            PoolKind::Large => c.segments_large += 1,
        }
        c.update_peaks();
        Ok(node)
    }

    /// Poll every event in flight; blocks of completed ones go to the shared pool. True if any did.
    fn poll_events(&mut self) -> Result<bool, AllocError> {
        let mut moved = false;
        for s in 0..self.streams.len() {
            if let Some(event) = &self.streams[s].in_flight {
                let done = self
                    .source
                    .event_completed(event)
                    .map_err(|e| source_error(format!("querying an event on {}", self.streams[s].id), e))?;
                if done {
                    self.event_completed(s);
                    moved = true;
                }
            }
        }
        Ok(moved)
    }

    /// On a miss for `owner`: move blocks whose events completed, and record events on the other
    /// streams that hold uncovered frees, so a later miss can use them. True if blocks moved.
    fn reclaim_for(&mut self, owner: usize) -> Result<bool, AllocError> {
        let moved = self.poll_events()?;
        for s in 0..self.streams.len() {
            if s + 1 != owner && self.streams[s].in_flight.is_none() && !self.pools[s + 1].is_empty() {
                self.record_event(s, false)?;
            }
        }
        Ok(moved)
    }

    /// Record an event on stream slot `s` covering every free on it so far. `then_wait`: the host waits on
    /// it at once (a flush), so the blocks are never held back and the active peak does not count them.
    fn record_event(&mut self, s: usize, then_wait: bool) -> Result<(), AllocError> {
        let stream = self.streams[s].id;
        let event = match self.spare_events.pop() {
            Some(e) => e,
            None => self
                .source
                .create_event()
                .map_err(|e| source_error(format!("creating an event for {stream}"), e))?,
        };
        if let Err(e) = self.source.record_event(&event, stream) {
            self.spare_events.push(event);
            return Err(source_error(format!("recording an event on {stream}"), e));
        }
        let st = &mut self.streams[s];
        st.covered_seq = st.next_seq;
        st.in_flight = Some(event);
        // Every block in the stream's pools was freed before the event: all are now waiting on it.
        let pools = &self.pools[s + 1];
        let bytes: usize = pools
            .small
            .entries()
            .iter()
            .chain(pools.large.entries())
            .map(|e| e.size)
            .sum();
        self.counters.waiting_bytes += bytes;
        self.counters.num_events_recorded += 1;
        if !then_wait {
            self.counters.update_peaks();
        }
        Ok(())
    }

    /// The event of stream slot `s` completed: its covered blocks become free for every stream.
    fn event_completed(&mut self, s: usize) {
        if let Some(event) = self.streams[s].in_flight.take() {
            self.spare_events.push(event);
        }
        let covered = self.streams[s].covered_seq;
        let mut moving = std::mem::take(&mut self.scratch);
        moving.clear();
        let pools = &self.pools[s + 1];
        for e in pools.small.entries().iter().chain(pools.large.entries()) {
            if self.nodes[e.node as usize].seq < covered {
                moving.push(e.node);
            }
        }
        // The event is no longer in flight; waiting bytes are recomputed as the blocks move.
        for &idx in &moving {
            self.pool_remove(idx);
            self.nodes[idx as usize].owner = ANY;
            let merged = self.merge_with_free_neighbours(idx);
            self.pool_insert(merged);
        }
        self.scratch = moving;
    }

    /// Wait for every cached free to be safe, then release every segment with no allocated block.
    fn flush(&mut self) -> Result<(), AllocError> {
        for s in 0..self.streams.len() {
            if self.streams[s].in_flight.is_some() {
                self.wait_and_complete(s)?;
            }
            if !self.pools[s + 1].is_empty() {
                self.record_event(s, true)?;
                self.wait_and_complete(s)?;
            }
        }
        for seg in 0..self.segments.len() {
            let sg = self.segments[seg];
            if !sg.live {
                continue;
            }
            let first = self.nodes[sg.first as usize];
            if first.state != NodeState::Free || first.size != sg.size {
                continue;
            }
            self.source
                .release(sg.addr, sg.size)
                .map_err(|e| source_error(format!("releasing a {}-byte segment", sg.size), e))?;
            self.pool_remove(sg.first);
            self.drop_node(sg.first);
            self.segments[seg].live = false;
            self.free_segments.push(seg as u32);
            let c = &mut self.counters;
            c.reserved_bytes -= sg.size;
            c.num_segment_frees += 1;
            match sg.kind {
                PoolKind::Small => c.segments_small -= 1,
                PoolKind::Large => c.segments_large -= 1,
            }
        }
        self.counters.num_cache_flushes += 1;
        Ok(())
    }

    fn wait_and_complete(&mut self, s: usize) -> Result<(), AllocError> {
        let stream = self.streams[s].id;
        if let Some(event) = &self.streams[s].in_flight {
            self.source
                .wait_event(event)
                .map_err(|e| source_error(format!("waiting for an event on {stream}"), e))?;
        }
        self.event_completed(s);
        Ok(())
    }

    fn largest_free_block(&self) -> usize {
        self.pools
            .iter()
            .flat_map(|p| [p.small.largest(), p.large.largest()])
            .flatten()
            .map(|e| e.size)
            .max()
            .unwrap_or(0)
    }

    fn stats(&self) -> AllocatorStats {
        let free_blocks = self.pools.iter().map(|p| p.small.len() + p.large.len()).sum();
        self.counters.snapshot(
            self.config.caching,
            self.largest_free_block(),
            free_blocks,
            self.inactive_split_bytes(),
        )
    }

    /// Free bytes in segments that also hold allocated blocks (a walk over all blocks: for stats only).
    fn inactive_split_bytes(&self) -> usize {
        let mut total = 0;
        for sg in self.segments.iter().filter(|s| s.live) {
            let (mut free, mut any_allocated) = (0, false);
            let mut i = sg.first;
            while i != NONE {
                let n = &self.nodes[i as usize];
                match n.state {
                    NodeState::Free => free += n.size,
                    _ => any_allocated = true,
                }
                i = n.next;
            }
            if any_allocated {
                total += free;
            }
        }
        total
    }

    fn oom_report(&mut self, bytes: usize, block_size: usize, segment_size: usize, stream: StreamId) -> OomReport {
        let (device_free, device_total) = match self.source.memory_info() {
            Some((f, t)) => (Some(f), Some(t)),
            None => (None, None),
        };
        let c = &self.counters;
        OomReport {
            caching: self.config.caching,
            device: self.source.name(),
            stream,
            requested: bytes,
            block_size,
            segment_size,
            device_free,
            device_total,
            allocated: c.allocated_bytes,
            reserved: c.reserved_bytes,
            reserved_free: c.reserved_bytes - c.allocated_bytes,
            largest_free_block: self.largest_free_block(),
        }
    }

    fn snapshot(&self) -> Vec<SegmentSnapshot> {
        let mut out = Vec::new();
        for sg in self.segments.iter().filter(|s| s.live) {
            let mut blocks = Vec::new();
            let mut i = sg.first;
            while i != NONE {
                let n = &self.nodes[i as usize];
                let state = match n.state {
                    NodeState::Allocated => BlockState::Allocated {
                        stream: self.streams[n.owner - 1].id,
                    },
                    NodeState::Free => BlockState::Free {
                        owner: if n.owner == ANY {
                            None
                        } else {
                            Some(self.streams[n.owner - 1].id)
                        },
                        waiting: self.is_waiting(n.owner, n.seq),
                    },
                    NodeState::Unused => panic!("unused node {i} linked into a segment"),
                };
                blocks.push(BlockSnapshot {
                    addr: n.addr,
                    size: n.size,
                    state,
                });
                i = n.next;
            }
            out.push(SegmentSnapshot {
                addr: sg.addr,
                size: sg.size,
                kind: sg.kind,
                blocks,
            });
        }
        out.sort_by_key(|s| s.addr);
        out
    }

    fn check_consistency(&self) -> Result<(), String> {
        let mut free_seen = 0usize;
        for (si, sg) in self.segments.iter().enumerate().filter(|(_, s)| s.live) {
            let mut i = sg.first;
            let mut prev = NONE;
            let mut addr = sg.addr;
            while i != NONE {
                let n = &self.nodes[i as usize];
                if n.segment as usize != si || n.prev != prev || n.addr != addr || n.kind != sg.kind {
                    return Err(format!("block {i} at {:#x}: broken link in segment {si}", n.addr));
                }
                if n.state == NodeState::Free {
                    free_seen += 1;
                    let pool = self.pools[n.owner].get(n.kind);
                    if !pool
                        .entries()
                        .iter()
                        .any(|e| e.node == i && e.size == n.size && e.addr == n.addr)
                    {
                        return Err(format!("free block {i} at {:#x} is not in its pool", n.addr));
                    }
                    if prev != NONE {
                        let p = &self.nodes[prev as usize];
                        if p.state == NodeState::Free && p.owner == n.owner {
                            return Err(format!(
                                "free blocks at {:#x} and {:#x} were not merged",
                                p.addr, n.addr
                            ));
                        }
                    }
                    if n.owner != ANY && n.seq >= self.streams[n.owner - 1].next_seq {
                        return Err(format!(
                            "free block at {:#x} has a sequence number from the future",
                            n.addr
                        ));
                    }
                } else if n.state != NodeState::Allocated {
                    return Err(format!("unused node {i} linked into segment {si}"));
                }
                addr += n.size as u64;
                prev = i;
                i = n.next;
            }
            if addr != sg.addr + sg.size as u64 {
                return Err(format!(
                    "blocks of segment {si} end at {addr:#x}, not at the segment end"
                ));
            }
        }
        let in_pools: usize = self.pools.iter().map(|p| p.small.len() + p.large.len()).sum();
        if in_pools != free_seen {
            return Err(format!(
                "{in_pools} pool entries but {free_seen} free blocks in segments"
            ));
        }
        for p in &self.pools {
            for pool in [&p.small, &p.large] {
                if pool
                    .entries()
                    .windows(2)
                    .any(|w| (w[0].size, w[0].addr) >= (w[1].size, w[1].addr))
                {
                    return Err("a pool is not sorted".into());
                }
            }
        }
        Ok(())
    }
}

fn source_error(doing: String, error: SourceError) -> AllocError {
    AllocError::Source { doing, error }
}

impl<S: MemorySource> Drop for Inner<S> {
    /// Wait for queued frees, then give every segment and event back. Blocks still held by callers are
    /// released too: the allocator owns the memory, and dropping it ends their lifetime.
    fn drop(&mut self) {
        for s in 0..self.streams.len() {
            if let Some(event) = self.streams[s].in_flight.take() {
                let _ = self.source.wait_event(&event);
                self.source.destroy_event(event);
            }
        }
        for event in std::mem::take(&mut self.spare_events) {
            self.source.destroy_event(event);
        }
        // A failed release is reported, not swallowed: it means the driver kept memory this process
        // believes it gave back (or the context is gone), which the person reading the log should know.
        for sg in self.segments.iter().filter(|s| s.live) {
            if let Err(e) = self.source.release(sg.addr, sg.size) {
                eprintln!(
                    "warning: {}: giving back a {} segment at {:#x} failed: {e}",
                    self.source.name(),
                    crate::stats::fmt_bytes(sg.size),
                    sg.addr
                );
            }
        }
    }
}
