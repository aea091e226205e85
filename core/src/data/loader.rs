//! The distributed data loader: batches of B x T tokens per rank, a resumable position, background prefetch.
//!
//! Layout of one step (llm.c's and nanochat's): the step covers `world_size * B * T` consecutive tokens of
//! the current shard starting at `position`; rank r reads the `B * T + 1` tokens starting at
//! `position + r * B * T` (inputs = the first B*T, targets = the same shifted by one). So ranks read disjoint
//! windows (sharing only the one boundary token) and together consume the stream in order. When the next
//! step would run past the end of the shard, the loader moves to the next shard at position 0; after the
//! last shard it wraps to the first and the epoch count goes up (the batch says so).
//!
//! The position (`LoaderState`) is the same on every rank and small; `restore` continues with exactly the
//! batch that would have come next. The position is the whole run's, not a rank's: each rank's window is
//! derived from it, so a run resumed at another world size (`LoaderState::for_layout`) re-splits the same
//! stream among its ranks. Batches are produced by a background thread into a bounded crossbeam
//! channel, so the training loop does not wait on page faults of the mmap'd shards.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::shard::Shard;
use crate::bail;
use crate::error::Result;

/// Batches prepared ahead of the training loop.
const PREFETCH_DEPTH: usize = 4;

/// Where the loader is: the step that comes next starts at token `position` of shard `shard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub shard: usize,
    pub position: usize,
    /// Completed passes over the data.
    pub epoch: u64,
    /// `world_size * B * T` of the run that saved this state; restoring into another layout is an error.
    pub tokens_per_step: usize,
}

impl LoaderState {
    /// This position for a run whose loader steps are `tokens_per_step` tokens (another world size or device
    /// batch, resuming a checkpoint). What is kept: the next step starts at the very token the saved run
    /// would have read next, and the ranks' windows tile the stream from there in rank order, so within the
    /// epoch no token before the position is read again and none after it is skipped, except the tail of a
    /// shard too short for a whole step, which the loader always skips (shorter than one step of the new
    /// layout, so it may differ from the tail the old layout would have skipped). An optimizer step of a fixed
    /// total batch covers the same consecutive tokens at any world size (its micro-steps follow each other in
    /// the stream), away from those tails.
    pub fn for_layout(self, tokens_per_step: usize) -> LoaderState {
        LoaderState {
            tokens_per_step,
            ..self
        }
    }
}

/// One rank's batch: row-major `B x T`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<i32>,
    /// The epoch this batch belongs to (0 for the first pass).
    pub epoch: u64,
    /// True for the first batch after wrapping around to the start of the data.
    pub wrapped: bool,
    /// The loader's state right after this batch: save it to resume with the next one.
    pub state_after: LoaderState,
}

/// A source of tokens: an mmap'd shard or an in-memory stream (the embedded corpus).
pub enum TokenPart {
    Shard(Shard),
    Memory(Vec<u32>),
}

impl TokenPart {
    fn len(&self) -> usize {
        match self {
            TokenPart::Shard(s) => s.len(),
            TokenPart::Memory(v) => v.len(),
        }
    }

    fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        match self {
            TokenPart::Shard(s) => s.read_into(start, n, out),
            TokenPart::Memory(v) => out.extend_from_slice(&v[start..start + n]),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    rank: usize,
    world_size: usize,
    batch: usize,
    seq_len: usize,
}

impl Layout {
    fn tokens_per_step(&self) -> usize {
        self.world_size * self.batch * self.seq_len
    }
}

/// The step-by-step walk over the parts; shared by the prefetch thread and the tests.
struct Cursor {
    parts: Arc<Vec<TokenPart>>,
    layout: Layout,
    state: LoaderState,
}

impl Cursor {
    /// A part can serve a step if it holds all ranks' windows plus the final target token.
    fn fits(&self, part: usize) -> bool {
        self.parts[part].len() > self.layout.tokens_per_step()
    }

    /// Move to the first position from which a whole step fits (the current one if it does), passing to
    /// the next part, and after the last part back to the first with the epoch count up by one.
    fn settle(&mut self) {
        for _ in 0..=self.parts.len() {
            let need = self.state.position + self.layout.tokens_per_step() + 1;
            if self.state.shard < self.parts.len() && need <= self.parts[self.state.shard].len() {
                return;
            }
            self.state.position = 0;
            self.state.shard += 1;
            if self.state.shard >= self.parts.len() {
                self.state.shard = 0;
                self.state.epoch = self.state.epoch.saturating_add(1);
            }
        }
        unreachable!("the loader was built with at least one part that fits a step")
    }

    fn next_batch(&mut self) -> Batch {
        self.settle(); // a no-op except for a fresh or restored state
        let first_part = (0..self.parts.len()).find(|&p| self.fits(p)).expect("one part fits");
        let wrapped = self.state.epoch > 0 && self.state.position == 0 && self.state.shard == first_part;
        let l = self.layout;
        let bt = l.batch * l.seq_len;
        let mut window = Vec::with_capacity(bt + 1);
        self.parts[self.state.shard].read_into(self.state.position + l.rank * bt, bt + 1, &mut window);
        let epoch = self.state.epoch;
        self.state.position += l.tokens_per_step();
        // The state after the batch is where the next step really starts (so a saved state is settled).
        self.settle();
        let inputs = window[..bt].to_vec();
        let targets = window[1..].iter().map(|&t| t as i32).collect();
        Batch {
            inputs,
            targets,
            epoch,
            wrapped,
            state_after: self.state,
        }
    }
}

pub struct DataLoader {
    parts: Arc<Vec<TokenPart>>,
    layout: Layout,
    start: LoaderState,
    /// The state after the last batch handed out (= the position of the next one).
    state: LoaderState,
    rx: Option<Receiver<Batch>>,
    worker: Option<JoinHandle<()>>,
}

impl DataLoader {
    /// A loader over token shards (opened and checked; tokens are not checked against a vocabulary).
    pub fn new(shard_paths: &[PathBuf], rank: usize, world_size: usize, batch: usize, seq_len: usize) -> Result<Self> {
        Self::open(shard_paths, None, rank, world_size, batch, seq_len)
    }

    /// A loader over token shards, checking every token against `vocab_size` when given.
    pub fn open(
        shard_paths: &[PathBuf],
        vocab_size: Option<usize>,
        rank: usize,
        world_size: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Self> {
        if shard_paths.is_empty() {
            bail!("no token shards given to the loader; make some with `nc-data tokenize` or `nc-data synth`");
        }
        // Opening checks every shard (and scans its tokens when a vocabulary is given): in parallel.
        let parts = shard_paths
            .par_iter()
            .map(|p| Shard::open(p, vocab_size).map(TokenPart::Shard))
            .collect::<Result<Vec<_>>>()?;
        let what = format!(
            "{} shard(s) starting with {}",
            shard_paths.len(),
            shard_paths[0].display()
        );
        Self::from_parts(parts, &what, rank, world_size, batch, seq_len)
    }

    /// A loader over in-memory token streams (each treated like one shard).
    pub fn from_tokens(
        streams: Vec<Vec<u32>>,
        rank: usize,
        world_size: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Self> {
        let parts = streams.into_iter().map(TokenPart::Memory).collect();
        Self::from_parts(parts, "the in-memory token stream", rank, world_size, batch, seq_len)
    }

    fn from_parts(
        parts: Vec<TokenPart>,
        what: &str,
        rank: usize,
        world_size: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not below the world size {world_size}");
        }
        if batch == 0 || seq_len == 0 {
            bail!("batch size {batch} and sequence length {seq_len} must both be positive");
        }
        let fits = world_size
            .checked_mul(batch)
            .and_then(|n| n.checked_mul(seq_len))
            .is_some_and(|n| n < usize::MAX / 2);
        if !fits {
            bail!("{world_size} rank(s) x batch {batch} x sequence length {seq_len} tokens per step is too large");
        }
        let layout = Layout {
            rank,
            world_size,
            batch,
            seq_len,
        };
        let step = layout.tokens_per_step();
        let largest = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        if largest <= step {
            bail!(
                "{what}: the largest shard has {largest} tokens, but one step of {world_size} rank(s) x {batch} x \
                 {seq_len} needs {} consecutive tokens; use more data, or a smaller batch or sequence length",
                step + 1
            );
        }
        let parts = Arc::new(parts);
        let start = LoaderState {
            shard: 0,
            position: 0,
            epoch: 0,
            tokens_per_step: step,
        };
        let mut loader = DataLoader {
            parts,
            layout,
            start,
            state: start,
            rx: None,
            worker: None,
        };
        loader.spawn(start);
        Ok(loader)
    }

    fn spawn(&mut self, state: LoaderState) {
        self.stop();
        let (tx, rx) = bounded(PREFETCH_DEPTH);
        let mut cursor = Cursor {
            parts: self.parts.clone(),
            layout: self.layout,
            state,
        };
        let worker = std::thread::Builder::new()
            .name("nc-loader".into())
            .spawn(move || {
                // Runs until the loader drops its receiver.
                while tx.send(cursor.next_batch()).is_ok() {}
            })
            .expect("spawning the loader thread");
        self.rx = Some(rx);
        self.worker = Some(worker);
        self.state = state;
    }

    fn stop(&mut self) {
        self.rx = None; // the worker's next send fails and it returns
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }

    /// The next batch for this rank.
    pub fn next_batch(&mut self) -> Batch {
        let rx = self.rx.as_ref().expect("the loader always has a worker between calls");
        let batch = rx.recv().expect("the loader thread ends only when the loader stops it");
        self.state = batch.state_after;
        batch
    }

    /// The position of the next batch: save it with a checkpoint.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved state: the next batch is the one that followed it.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        let step = self.layout.tokens_per_step();
        if state.tokens_per_step != step {
            bail!(
                "the saved loader state is for steps of {} tokens but this run's are {step} (world size x batch x \
                 sequence length changed); resume with the same layout",
                state.tokens_per_step
            );
        }
        if state.shard >= self.parts.len() {
            bail!(
                "the saved loader state points at shard {} but there are {} shards",
                state.shard,
                self.parts.len()
            );
        }
        let len = self.parts[state.shard].len();
        if state.position > len {
            bail!(
                "the saved loader state points at token {} of shard {}, which has {len} tokens; the data changed \
                 since the checkpoint was saved",
                state.position,
                state.shard
            );
        }
        self.spawn(state);
        Ok(())
    }

    /// Go back to the very first batch (for the validation loader before each evaluation).
    pub fn reset(&mut self) {
        self.spawn(self.start);
    }

    /// Total tokens across all parts.
    pub fn total_tokens(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// Loader steps in one pass over the data (each part serves steps from its start while a whole step and
    /// the final target fit).
    pub fn steps_per_epoch(&self) -> usize {
        let step = self.layout.tokens_per_step();
        self.parts.iter().map(|p| p.len().saturating_sub(1) / step).sum()
    }

    /// Parts too small to hold one step; they are skipped.
    pub fn skipped_parts(&self) -> usize {
        let step = self.layout.tokens_per_step();
        self.parts.iter().filter(|p| p.len() <= step).count()
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_skips_parts_too_small_for_a_step() {
        let parts = Arc::new(vec![
            TokenPart::Memory(vec![1; 5]),
            TokenPart::Memory((0..20).collect()),
        ]);
        let layout = Layout {
            rank: 0,
            world_size: 1,
            batch: 2,
            seq_len: 4,
        };
        let mut c = Cursor {
            parts,
            layout,
            state: LoaderState {
                shard: 0,
                position: 0,
                epoch: 0,
                tokens_per_step: 8,
            },
        };
        assert!(!c.fits(0) && c.fits(1));
        let b = c.next_batch();
        assert_eq!(b.inputs, (0..8).collect::<Vec<u32>>());
        assert_eq!(b.epoch, 0);
    }

    /// steps_per_epoch counts exactly the batches before the loader wraps.
    #[test]
    fn steps_per_epoch_is_one_pass() {
        for (lens, batch) in [(vec![5usize, 20, 17], 2usize), (vec![9, 8], 2), (vec![100], 3)] {
            let streams: Vec<Vec<u32>> = lens.iter().map(|&n| (0..n as u32).collect()).collect();
            let mut l = DataLoader::from_tokens(streams, 0, 1, batch, 4).unwrap();
            let n = l.steps_per_epoch();
            for i in 0..n {
                assert_eq!(l.next_batch().epoch, 0, "{lens:?}: batch {i}");
            }
            let b = l.next_batch();
            assert!(b.epoch == 1 && b.wrapped, "{lens:?}: batch {n} starts the next pass");
        }
    }

    /// A state restored at another world size continues at the saved token: two ranks' windows of the next
    /// step are the one-rank loader's next two batches.
    #[test]
    fn a_state_resplits_to_another_world_size() {
        let tokens: Vec<u32> = (0..400).collect();
        let mut one = DataLoader::from_tokens(vec![tokens.clone()], 0, 1, 2, 4).unwrap();
        for _ in 0..3 {
            one.next_batch();
        }
        let saved = one.state();
        let mut two: Vec<DataLoader> = (0..2)
            .map(|r| DataLoader::from_tokens(vec![tokens.clone()], r, 2, 2, 4).unwrap())
            .collect();
        for l in &mut two {
            assert!(l.restore(saved).is_err(), "a changed layout needs for_layout");
            l.restore(saved.for_layout(16)).unwrap();
        }
        for _ in 0..2 {
            let want: Vec<u32> = [one.next_batch().inputs, one.next_batch().inputs].concat();
            let got: Vec<u32> = [two[0].next_batch().inputs, two[1].next_batch().inputs].concat();
            assert_eq!(got, want);
        }
    }
}
