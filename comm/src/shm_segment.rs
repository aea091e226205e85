//! The shared-memory segment of a `ShmRing`: a file under /dev/shm that every local rank maps.
//!
//! Layout (offsets in bytes; every part 64-byte aligned so no two writers share a cache line):
//! - `Header` at 0: magic, world size, slots per rank, payload bytes per slot, the creator's pid.
//! - `RankRecord` per rank at `RECORDS_AT + 256 * r`: the rank's two epoch counters and its liveness.
//! - Slots: rank r owns `slots` slots at `data_at + r * slots * slot_stride`; each is a `SlotHeader`
//!   followed by the payload. Only rank r writes its slots; only rank r+1 reads them.
//!
//! Each counter has one writer (the rank the record belongs to), which is what lets the flag protocol
//! (shm_flags.rs) work with plain release stores and acquire loads.

use crate::CommError;
use memmap2::MmapRaw;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

const MAGIC: u64 = u64::from_le_bytes(*b"ncshmrg1");
const RECORDS_AT: usize = 4096;
const RECORD_BYTES: usize = 256;
pub const SLOT_HEADER_BYTES: usize = 64;

/// What a rank's `state` says about it.
pub const STATE_ABSENT: u64 = 0;
pub const STATE_JOINED: u64 = 1;
/// Dropped its ring on purpose: not an error unless someone still waits on it.
pub const STATE_LEFT: u64 = 2;
/// A collective failed on that rank: its peers must fail too rather than wait for it.
pub const STATE_FAILED: u64 = 3;

#[repr(C)]
struct Header {
    magic: u64,
    world_size: u64,
    slots: u64,
    slot_bytes: u64,
    creator_pid: u64,
}

/// One rank's flags. `sent` and `consumed` only ever grow (epoch counters): a flag is never reset, so a
/// reader can never see a stale "ready" from an earlier round as a fresh one.
#[repr(C, align(64))]
pub struct RankRecord {
    /// Slices this rank has published to rank+1 (written by this rank, read by rank+1).
    pub sent: AtomicU64,
    _pad0: [u64; 7],
    /// Slices this rank has finished reading from rank-1's slots (written by this rank, read by rank-1).
    pub consumed: AtomicU64,
    _pad1: [u64; 7],
    /// Process id and its start time (clock ticks since boot, from /proc), so a reused pid is not taken
    /// for the rank.
    pub pid: AtomicU64,
    pub start_time: AtomicU64,
    /// One of the STATE_* values.
    pub state: AtomicU64,
    /// When this rank failed because of another: that rank + 1 (0 = none), so the ranks that learn of the
    /// failure second-hand still name the rank that caused it.
    pub blame: AtomicU64,
    _pad2: [u64; 4],
    _pad3: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<RankRecord>() == RECORD_BYTES);

/// Written with each slice so the receiver can check it got the slice it expects: different collectives
/// or bounds on different ranks become an error instead of silently wrong sums.
#[repr(C)]
pub struct SlotHeader {
    pub seq: u64,
    pub tag: u64,
    pub start: u64,
    pub len: u64,
}

/// A mapped segment.
pub struct Segment {
    map: MmapRaw,
    path: PathBuf,
    pub world_size: usize,
    pub slots: usize,
    pub slot_bytes: usize,
    data_at: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

fn layout(world_size: usize, slots: usize, slot_bytes: usize) -> (usize, usize) {
    let data_at = round_up(RECORDS_AT + world_size * RECORD_BYTES, 4096);
    let total = data_at + world_size * slots * (SLOT_HEADER_BYTES + slot_bytes);
    (data_at, round_up(total, 4096))
}

fn err(message: String) -> CommError {
    CommError::unranked(message)
}

impl Segment {
    /// Rank 0: creates the file (replacing a stale one of the same name), sizes it with real pages (so a
    /// full /dev/shm is an error now, not a SIGBUS later), maps it and writes the header.
    pub fn create(path: &Path, world_size: usize, slots: usize, slot_bytes: usize) -> Result<Segment, CommError> {
        assert!(slot_bytes.is_multiple_of(64) && slots >= 1);
        let (data_at, total) = layout(world_size, slots, slot_bytes);
        let open = || OpenOptions::new().read(true).write(true).create_new(true).open(path);
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a crashed run that had the same name; nobody can be using it, since names are
                // unique per live run.
                let _ = fs::remove_file(path);
                open()
            }
            other => other,
        }
        .map_err(|e| {
            err(format!(
                "cannot create the shared-memory segment {}: {e}",
                path.display()
            ))
        })?;
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        if rc != 0 {
            let _ = fs::remove_file(path);
            return Err(err(format!(
                "cannot reserve {total} bytes for the shared-memory segment {}: {} (is /dev/shm full or too \
                 small? under docker, raise --shm-size)",
                path.display(),
                io::Error::from_raw_os_error(rc)
            )));
        }
        let seg = Self::map(file, path, world_size, slots, slot_bytes, data_at, total)?;
        // The file is fresh, so every flag starts at zero; only the header needs writing.
        let h = seg.map.as_mut_ptr() as *mut Header;
        unsafe {
            h.write(Header {
                magic: MAGIC,
                world_size: world_size as u64,
                slots: slots as u64,
                slot_bytes: slot_bytes as u64,
                creator_pid: std::process::id() as u64,
            })
        };
        Ok(seg)
    }

    /// Other ranks: opens the segment rank 0 created and checks it was made for this run's shape.
    pub fn open(path: &Path, world_size: usize) -> Result<Segment, CommError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open the shared-memory segment {}: {e}", path.display())))?;
        let file_len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        if file_len < RECORDS_AT {
            return Err(err(format!("{} is too short to be a ring segment", path.display())));
        }
        let header = {
            let map = MmapRaw::map_raw(&file)
                .map_err(|e| err(format!("cannot map the shared-memory segment {}: {e}", path.display())))?;
            unsafe { (map.as_ptr() as *const Header).read() }
        };
        let (slots, slot_bytes) = (header.slots as usize, header.slot_bytes as usize);
        let ok = header.magic == MAGIC
            && header.world_size == world_size as u64
            && slots >= 1
            && slot_bytes.is_multiple_of(64)
            && slots
                .checked_mul(slot_bytes + SLOT_HEADER_BYTES)
                .is_some_and(|b| b < 1 << 40);
        if !ok {
            return Err(err(format!(
                "{} is not a ring segment for {world_size} ranks (magic {:#x}, world size {})",
                path.display(),
                header.magic,
                header.world_size
            )));
        }
        let (data_at, total) = layout(world_size, slots, slot_bytes);
        if file_len != total {
            return Err(err(format!(
                "{} has {file_len} bytes, its header implies {total}",
                path.display()
            )));
        }
        Self::map(file, path, world_size, slots, slot_bytes, data_at, total)
    }

    fn map(
        file: File,
        path: &Path,
        world_size: usize,
        slots: usize,
        slot_bytes: usize,
        data_at: usize,
        total: usize,
    ) -> Result<Segment, CommError> {
        let map = MmapRaw::map_raw(&file)
            .map_err(|e| err(format!("cannot map the shared-memory segment {}: {e}", path.display())))?;
        if map.len() != total {
            return Err(err(format!(
                "{} mapped {} bytes, expected {total}",
                path.display(),
                map.len()
            )));
        }
        Ok(Segment {
            map,
            path: path.to_path_buf(),
            world_size,
            slots,
            slot_bytes,
            data_at,
        })
    }

    /// Removes the name; the memory lives on until the last rank unmaps it.
    pub fn unlink(&self) -> io::Result<()> {
        fs::remove_file(&self.path)
    }

    pub fn record(&self, rank: usize) -> &RankRecord {
        assert!(rank < self.world_size);
        // In bounds and 64-byte aligned (the map is page aligned); the record holds only atomics, which
        // are fine to share between processes.
        unsafe { &*(self.map.as_ptr().add(RECORDS_AT + rank * RECORD_BYTES) as *const RankRecord) }
    }

    /// Start of slot `slot` of `rank`: a SlotHeader, then `slot_bytes` of payload.
    pub fn slot(&self, rank: usize, slot: usize) -> *mut u8 {
        assert!(rank < self.world_size && slot < self.slots);
        let stride = SLOT_HEADER_BYTES + self.slot_bytes;
        unsafe {
            self.map
                .as_mut_ptr()
                .add(self.data_at + (rank * self.slots + slot) * stride)
        }
    }
}
