//! A memory source in host memory, for tests and benchmarks.
//!
//! Backed mode hands out real host memory (so tests can write canaries into blocks and catch a block
//! handed out twice); unbacked mode hands out addresses only, for traces of multi-GiB training steps.
//! Events complete only when a test says so (`complete_oldest_event`, `complete_all_events`) or when the
//! allocator waits on one, which simulates a GPU that has not yet caught up with the host.

use crate::source::{MemorySource, SourceError, StreamId};
use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;

/// Alignment of every segment handed out (the allocator's granule).
const SEGMENT_ALIGN: usize = 512;
/// Unbacked addresses start here, so 0 and small integers are never valid.
const UNBACKED_BASE: u64 = 1 << 40;

/// One recording of an event on a stream, in recording order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRecord {
    pub stream: StreamId,
    pub completed: bool,
}

/// A host event: an index into the source's event table, which points at its latest recording.
#[derive(Debug)]
pub struct HostEvent(usize);

pub struct HostSource {
    capacity: usize,
    backed: bool,
    used: usize,
    /// Live segments: address -> size.
    live: BTreeMap<u64, usize>,
    next_unbacked: u64,
    /// Per event handle: index of its latest recording in `records`, None if never recorded or destroyed.
    events: Vec<Option<usize>>,
    destroyed: Vec<bool>,
    records: Vec<EventRecord>,
    pub allocate_calls: u64,
    pub release_calls: u64,
}

impl HostSource {
    /// Real host memory, at most `capacity` bytes at a time (beyond that, allocate reports out-of-memory).
    pub fn backed(capacity: usize) -> Self {
        Self::new(capacity, true)
    }

    /// Addresses only (nothing may be written to them), at most `capacity` bytes at a time.
    pub fn unbacked(capacity: usize) -> Self {
        Self::new(capacity, false)
    }

    fn new(capacity: usize, backed: bool) -> Self {
        HostSource {
            capacity,
            backed,
            used: 0,
            live: BTreeMap::new(),
            next_unbacked: UNBACKED_BASE,
            events: Vec::new(),
            destroyed: Vec::new(),
            records: Vec::new(),
            allocate_calls: 0,
            release_calls: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in segments handed out and not yet released.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn live_segments(&self) -> usize {
        self.live.len()
    }

    /// The live segment (address, size) that holds `addr`, or None: the lookup a memory checker makes for
    /// each access (tests use it to ask what such a checker could see).
    pub fn segment_containing(&self, addr: u64) -> Option<(u64, usize)> {
        let (&base, &size) = self.live.range(..=addr).next_back()?;
        (addr < base + size as u64).then_some((base, size))
    }

    /// Whether [addr, addr + len) lies inside one live segment: what a memory checker accepts.
    pub fn range_is_live(&self, addr: u64, len: usize) -> bool {
        self.segment_containing(addr)
            .is_some_and(|(base, size)| addr + len as u64 <= base + size as u64)
    }

    /// Every recording of every event so far, in order.
    pub fn event_records(&self) -> &[EventRecord] {
        &self.records
    }

    /// Complete the oldest pending recording on `stream` (and so everything before it on that stream,
    /// which it already is: recordings on one stream complete in order). False if none is pending.
    pub fn complete_oldest_event(&mut self, stream: StreamId) -> bool {
        match self.records.iter_mut().find(|r| r.stream == stream && !r.completed) {
            Some(r) => {
                r.completed = true;
                true
            }
            None => false,
        }
    }

    pub fn complete_all_events(&mut self) {
        for r in &mut self.records {
            r.completed = true;
        }
    }

    pub fn pending_events(&self) -> usize {
        self.records.iter().filter(|r| !r.completed).count()
    }

    /// Panics unless [addr, addr+len) is whole granules inside one live segment: a test writing outside
    /// what it was given.
    fn check_range(&self, addr: u64, len: usize) {
        assert!(self.backed, "canaries need a backed host source");
        assert!(
            addr.is_multiple_of(SEGMENT_ALIGN as u64) && len.is_multiple_of(SEGMENT_ALIGN),
            "canary ranges are whole 512-byte granules: {addr:#x}+{len}"
        );
        let (&base, &size) = self
            .live
            .range(..=addr)
            .next_back()
            .unwrap_or_else(|| panic!("address {addr:#x} is not in any live segment"));
        assert!(
            addr + len as u64 <= base + size as u64,
            "range {addr:#x}+{len} leaves the segment {base:#x}+{size}"
        );
    }

    /// Write `tag` at the start of every 512-byte granule of [addr, addr+len). Any two blocks that overlap
    /// share at least one granule start (both are 512-aligned), so the later write shows in `check`.
    pub fn write_canary(&mut self, addr: u64, len: usize, tag: u64) {
        self.check_range(addr, len);
        for off in (0..len).step_by(SEGMENT_ALIGN) {
            // SAFETY: the range lies inside a live segment we allocated (checked above), aligned to 512.
            unsafe { ((addr as usize + off) as *mut u64).write(tag) };
        }
    }

    /// Whether every granule of [addr, addr+len) still holds `tag`.
    pub fn check_canary(&self, addr: u64, len: usize, tag: u64) -> bool {
        self.check_range(addr, len);
        (0..len).step_by(SEGMENT_ALIGN).all(|off| {
            // SAFETY: as in write_canary.
            unsafe { ((addr as usize + off) as *const u64).read() == tag }
        })
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, SEGMENT_ALIGN).expect("segment size overflows a Layout")
    }
}

impl MemorySource for HostSource {
    type Event = HostEvent;

    fn name(&self) -> String {
        if self.backed {
            "host".into()
        } else {
            "host (unbacked)".into()
        }
    }

    fn allocate(&mut self, bytes: usize) -> Result<u64, SourceError> {
        self.allocate_calls += 1;
        // Any positive size, as cuMemAlloc takes: the no-caching mode asks for exactly what a tensor needs.
        if bytes == 0 {
            return Err(SourceError::Failed("a segment of 0 bytes was asked for".into()));
        }
        if self.used + bytes > self.capacity {
            return Err(SourceError::OutOfMemory);
        }
        let addr = if self.backed {
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { alloc(Self::layout(bytes)) };
            if p.is_null() {
                return Err(SourceError::OutOfMemory);
            }
            p as u64
        } else {
            let a = self.next_unbacked;
            // The next segment starts on the next 512-byte boundary, as every segment does.
            self.next_unbacked += bytes.next_multiple_of(SEGMENT_ALIGN) as u64;
            a
        };
        self.used += bytes;
        self.live.insert(addr, bytes);
        Ok(addr)
    }

    fn release(&mut self, addr: u64, bytes: usize) -> Result<(), SourceError> {
        self.release_calls += 1;
        match self.live.get(&addr) {
            Some(&size) if size == bytes => {}
            other => {
                return Err(SourceError::Failed(format!(
                    "release of {addr:#x}+{bytes}, but the live segment there is {other:?}"
                )))
            }
        }
        self.live.remove(&addr);
        self.used -= bytes;
        if self.backed {
            // SAFETY: allocated by `allocate` with the same layout, and removed from `live` just now.
            unsafe { dealloc(addr as *mut u8, Self::layout(bytes)) };
        }
        Ok(())
    }

    fn memory_info(&mut self) -> Option<(usize, usize)> {
        Some((self.capacity - self.used, self.capacity))
    }

    fn create_event(&mut self) -> Result<HostEvent, SourceError> {
        self.events.push(None);
        self.destroyed.push(false);
        Ok(HostEvent(self.events.len() - 1))
    }

    fn record_event(&mut self, event: &HostEvent, stream: StreamId) -> Result<(), SourceError> {
        assert!(!self.destroyed[event.0], "record on a destroyed event");
        self.records.push(EventRecord {
            stream,
            completed: false,
        });
        self.events[event.0] = Some(self.records.len() - 1);
        Ok(())
    }

    fn event_completed(&mut self, event: &HostEvent) -> Result<bool, SourceError> {
        // An event never recorded counts as complete, as in CUDA.
        Ok(self.events[event.0].is_none_or(|r| self.records[r].completed))
    }

    fn wait_event(&mut self, event: &HostEvent) -> Result<(), SourceError> {
        // The host waits: the simulated device finishes everything on that stream up to the recording.
        if let Some(r) = self.events[event.0] {
            let stream = self.records[r].stream;
            for rec in self.records[..=r].iter_mut().filter(|x| x.stream == stream) {
                rec.completed = true;
            }
        }
        Ok(())
    }

    fn destroy_event(&mut self, event: HostEvent) {
        self.destroyed[event.0] = true;
    }
}

impl Drop for HostSource {
    fn drop(&mut self) {
        if self.backed {
            for (&addr, &bytes) in &self.live {
                // SAFETY: each live entry was allocated with this layout and not yet freed.
                unsafe { dealloc(addr as *mut u8, Self::layout(bytes)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_release_and_canaries() {
        let mut s = HostSource::backed(4 << 20);
        let a = s.allocate(2 << 20).unwrap();
        let b = s.allocate(2 << 20).unwrap();
        assert_eq!(s.allocate(512), Err(SourceError::OutOfMemory));
        assert_eq!(a % 512, 0);
        s.write_canary(a, 4096, 7);
        assert!(s.check_canary(a, 4096, 7));
        s.write_canary(a + 1024, 512, 9);
        assert!(!s.check_canary(a, 4096, 7), "an overwrite must show");
        assert!(
            s.release(a, 1 << 20).is_err(),
            "a release with the wrong size must be refused"
        );
        s.release(a, 2 << 20).unwrap();
        s.release(b, 2 << 20).unwrap();
        assert_eq!(s.used_bytes(), 0);
        assert!(s.release(b, 2 << 20).is_err());
    }

    #[test]
    fn events_complete_in_stream_order() {
        let mut s = HostSource::unbacked(1 << 30);
        let (x, y) = (StreamId(1), StreamId(2));
        let e1 = s.create_event().unwrap();
        let e2 = s.create_event().unwrap();
        assert!(s.event_completed(&e1).unwrap(), "never recorded counts as complete");
        s.record_event(&e1, x).unwrap();
        s.record_event(&e2, y).unwrap();
        assert!(!s.event_completed(&e1).unwrap());
        assert!(s.complete_oldest_event(y));
        assert!(!s.event_completed(&e1).unwrap());
        assert!(s.event_completed(&e2).unwrap());
        s.wait_event(&e1).unwrap();
        assert!(s.event_completed(&e1).unwrap());
        assert_eq!(s.pending_events(), 0);
    }
}
