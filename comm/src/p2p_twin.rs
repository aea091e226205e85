//! The GPU peer-to-peer ring's host twin: thread ranks that run the very plan tables `P2pRing` uploads
//! (`p2p_plan::encode_pieces`) with the kernels' arithmetic, on host memory. It lets CI, which has no GPU,
//! run everything above the kernels (which tensors a bucket exchanges, their bounds, the concatenated
//! tables of one launch, f32 and bf16 buffers, the one-shot all-reduce of the host collectives) and compare
//! it bit for bit with the other rings. The kernels themselves are checked by the CPU emulation
//! (comm/tests/p2p_emu.rs) and, on a GPU, by nc-p2p-bench.
//!
//! What it copies from `kernels-ptx/cuda/p2p_ring.cu`, operation by operation of a table:
//! - reduce-scatter send: the rank's own input widened to f32 at step 0, its f32 partial after that;
//! - reduce-scatter receive: partial = incoming + own input (f32); at the last step the owner rounds it into
//!   the buffer (bf16: once), before that it is kept as the partial (f32 in place in the buffer, as the f32
//!   kernel does; bf16 in a separate f32 scratch, leaving the buffer's other elements untouched);
//! - all-gather: elements move unchanged;
//! - one-shot all-reduce (messages up to `one_shot_bytes`): every rank's copy summed in rank order 0..n-1
//!   in f32, rounded once.
//!
//! A link is a channel of `slots` messages (a sender blocks while the next rank has `slots` unread: the
//! kernels' slot flow control), one message per table operation, carrying the operation it belongs to, so
//! ranks running tables that do not pair up fail with an error instead of summing the wrong elements.
//! Blocks are not modelled: they split each operation elementwise, which changes no result.

use crate::p2p::{one_shot_fits, P2pOptions};
use crate::p2p_plan::{encode_pieces, last_step, pieces_span, slice_elems, Piece};
use crate::partition::{even_bounds, Bounds};
use crate::schedule::Phase;
use crate::thread_ring::ring_links;
use crate::{bf16, Collective, CommError, Member};
use crossbeam_channel::{bounded, Receiver, Sender};
use nc_kernels::p2p::OP_RECV;

/// An element type of the twin: f32 or bf16, widened to f32 for sums as the kernels do.
pub trait TwinElem: Copy + Send + 'static {
    const BYTES: usize;
    /// Reduce-scatter keeps partials in the buffer itself (f32) or in a separate f32 scratch (bf16).
    const IN_PLACE: bool;
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;
    fn wrap(v: Vec<Self>) -> Payload;
    fn unwrap(p: Payload) -> Option<Vec<Self>>;
}

impl TwinElem for f32 {
    const BYTES: usize = 4;
    const IN_PLACE: bool = true;
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
    fn wrap(v: Vec<f32>) -> Payload {
        Payload::F32(v)
    }
    fn unwrap(p: Payload) -> Option<Vec<f32>> {
        match p {
            Payload::F32(v) => Some(v),
            Payload::Bf16(_) => None,
        }
    }
}

impl TwinElem for bf16 {
    const BYTES: usize = 2;
    const IN_PLACE: bool = false;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn wrap(v: Vec<bf16>) -> Payload {
        Payload::Bf16(v)
    }
    fn unwrap(p: Payload) -> Option<Vec<bf16>> {
        match p {
            Payload::Bf16(v) => Some(v),
            Payload::F32(_) => None,
        }
    }
}

/// What a message carries: f32 partials (reduce-scatter) or elements (all-gather, one-shot).
pub enum Payload {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// One message between neighbours: the table operation it belongs to (first element, count, step; a
/// one-shot copy says `step == u64::MAX`) and its data.
struct Message {
    start: u64,
    len: u64,
    step: u64,
    data: Payload,
}

/// One rank's end of the twin ring. Create all ranks with `P2pTwin::new` and move each to its own thread.
pub struct P2pTwin {
    member: Member,
    opts: P2pOptions,
    to_next: Sender<Message>,
    from_prev: Receiver<Message>,
    /// The bf16 reduce-scatter's f32 partials (the kernel's `work`), kept between calls.
    work: Vec<f32>,
}

impl P2pTwin {
    /// The `world_size` ranks of a twin ring with the GPU ring's `opts` (blocks and slot bytes set the slice
    /// size of the tables, slots the depth of each link, one_shot_bytes the one-shot threshold, timeout the
    /// longest wait on a neighbour).
    pub fn new(world_size: usize, opts: P2pOptions) -> Vec<P2pTwin> {
        assert!(opts.slots >= 1, "a link holds at least one slot");
        ring_links(world_size, || bounded(opts.slots))
            .into_iter()
            .map(|(member, to_next, from_prev)| P2pTwin {
                member,
                opts,
                to_next,
                from_prev,
                work: Vec::new(),
            })
            .collect()
    }

    pub fn options(&self) -> &P2pOptions {
        &self.opts
    }

    fn err(&self, m: String) -> CommError {
        CommError::at(self.member.rank, format!("P2P twin: {m}"))
    }

    fn send(&self, m: Message) -> Result<(), CommError> {
        let next = self.member.next();
        self.to_next.send_timeout(m, self.opts.timeout).map_err(|_| {
            self.err(format!(
                "rank {next} did not take a slice within {:?}",
                self.opts.timeout
            ))
        })
    }

    /// The next message, checked to belong to operation (start, len, step).
    fn recv(&self, start: u64, len: u64, step: u64) -> Result<Payload, CommError> {
        let prev = self.member.prev();
        let m = self
            .from_prev
            .recv_timeout(self.opts.timeout)
            .map_err(|_| self.err(format!("rank {prev} sent nothing within {:?}", self.opts.timeout)))?;
        if (m.start, m.len, m.step) != (start, len, step) {
            return Err(self.err(format!(
                "rank {prev} sent elements {}..{} of step {} where this rank expects {start}..{} of step {step}: the \
                 ranks run different plans",
                m.start,
                m.start + m.len,
                m.step,
                start + len
            )));
        }
        Ok(m.data)
    }

    fn table(&self, phase: Phase, elem_bytes: usize, span: usize, pieces: &[Piece]) -> Result<Vec<u64>, CommError> {
        let end = pieces_span(pieces, self.member.world_size).map_err(|m| self.err(m))?;
        if end > span {
            return Err(self.err(format!("the pieces reach element {end} of a span of {span}")));
        }
        let slice = slice_elems(phase, elem_bytes, self.opts.blocks, self.opts.slot_bytes);
        Ok(encode_pieces(phase, pieces, self.member.rank, slice))
    }

    /// `P2pRing::reduce_scatter_pieces` on a host span: each piece's owned range ends with the sum over
    /// ranks; f32: the rest of each piece holds partials; bf16: it is untouched.
    pub fn reduce_scatter_pieces<T: TwinElem>(&mut self, span: &mut [T], pieces: &[Piece]) -> Result<(), CommError> {
        let table = self.table(Phase::ReduceScatter, T::BYTES, span.len(), pieces)?;
        let last = last_step(self.member.world_size) as u64;
        if !T::IN_PLACE && self.work.len() < span.len() {
            self.work.resize(span.len(), 0.0);
        }
        for op in table.chunks(2) {
            let (start, word) = (op[0], op[1]);
            let (len, step) = (word & 0xffff_ffff, (word >> 32) & 0xffff);
            let elems = start as usize..(start + len) as usize;
            if word & OP_RECV != 0 {
                let theirs = f32::unwrap(self.recv(start, len, step)?)
                    .ok_or_else(|| self.err("a reduce-scatter received elements, not f32 partials".into()))?;
                for (i, t) in elems.zip(theirs) {
                    let sum = t + span[i].widen();
                    if step == last || T::IN_PLACE {
                        span[i] = T::narrow(sum);
                    } else {
                        self.work[i] = sum;
                    }
                }
            } else {
                let data: Vec<f32> = elems
                    .map(|i| {
                        if step == 0 || T::IN_PLACE {
                            span[i].widen()
                        } else {
                            self.work[i]
                        }
                    })
                    .collect();
                self.send(Message {
                    start,
                    len,
                    step,
                    data: Payload::F32(data),
                })?;
            }
        }
        Ok(())
    }

    /// `P2pRing::all_gather_pieces` on a host span: every rank's `bounds.range(r)` of each piece is rank r's.
    pub fn all_gather_pieces<T: TwinElem>(&mut self, span: &mut [T], pieces: &[Piece]) -> Result<(), CommError> {
        let table = self.table(Phase::AllGather, T::BYTES, span.len(), pieces)?;
        for op in table.chunks(2) {
            let (start, word) = (op[0], op[1]);
            let (len, step) = (word & 0xffff_ffff, (word >> 32) & 0xffff);
            let elems = start as usize..(start + len) as usize;
            if word & OP_RECV != 0 {
                let theirs = T::unwrap(self.recv(start, len, step)?)
                    .ok_or_else(|| self.err("an all-gather received elements of another type".into()))?;
                span[elems].copy_from_slice(&theirs);
            } else {
                self.send(Message {
                    start,
                    len,
                    step,
                    data: T::wrap(span[elems].to_vec()),
                })?;
            }
        }
        Ok(())
    }

    /// The one-shot all-reduce: every rank's copy, summed in rank order 0..n-1 in f32, rounded once. (Copies
    /// travel around the ring here; on the GPU every rank reads every peer's area.)
    fn one_shot<T: TwinElem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let n = self.member.world_size;
        let mut copies: Vec<Option<Vec<T>>> = vec![None; n];
        copies[self.member.rank] = Some(buf.to_vec());
        let len = buf.len() as u64;
        let mut forward = buf.to_vec();
        for k in 1..n {
            self.send(Message {
                start: 0,
                len,
                step: u64::MAX,
                data: T::wrap(forward),
            })?;
            let got = T::unwrap(self.recv(0, len, u64::MAX)?)
                .ok_or_else(|| self.err("a one-shot all-reduce received elements of another type".into()))?;
            forward = got.clone();
            copies[(self.member.rank + n - k) % n] = Some(got);
        }
        for (i, out) in buf.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (p, copy) in copies.iter().enumerate() {
                let term = copy.as_ref().expect("every rank's copy arrived")[i].widen();
                acc = if p == 0 { term } else { acc + term };
            }
            *out = T::narrow(acc);
        }
        Ok(())
    }

    /// `P2pRing::all_reduce_device`: one-shot up to the threshold, reduce-scatter + all-gather above.
    fn all_reduce<T: TwinElem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        if one_shot_fits(&self.opts, buf.len(), T::BYTES) {
            self.one_shot(buf)
        } else {
            let whole = [Piece {
                start: 0,
                bounds: even_bounds(buf.len(), self.member.world_size),
            }];
            self.reduce_scatter_pieces(buf, &whole)?;
            self.all_gather_pieces(buf, &whole)
        }
    }

    fn whole(&self, len: usize, bounds: &Bounds, what: &str) -> Result<[Piece; 1], CommError> {
        bounds.check_call(self.member, len, what)?;
        Ok([Piece {
            start: 0,
            bounds: bounds.clone(),
        }])
    }
}

/// The host collectives of `P2pRing` (its `Collective` implementation, without the staging copies).
impl Collective for P2pTwin {
    fn member(&self) -> Member {
        self.member
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        let whole = self.whole(buf.len(), bounds, "reduce_scatter_sum")?;
        self.reduce_scatter_pieces(buf, &whole)
    }
    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        let whole = self.whole(buf.len(), bounds, "all_gather")?;
        self.all_gather_pieces(buf, &whole)
    }
    fn reduce_scatter_sum_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        let whole = self.whole(buf.len(), bounds, "reduce_scatter_sum_bf16")?;
        self.reduce_scatter_pieces(buf, &whole)
    }
    fn all_gather_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        let whole = self.whole(buf.len(), bounds, "all_gather_bf16")?;
        self.all_gather_pieces(buf, &whole)
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce(buf)
    }
    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError> {
        self.all_reduce(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::sum_order;
    use crate::ThreadRing;

    /// Small slots so every tensor takes several slices and steps.
    fn small_opts() -> P2pOptions {
        P2pOptions {
            blocks: 2,
            slots: 2,
            slot_bytes: 64,
            one_shot_bytes: 64,
            timeout: std::time::Duration::from_secs(20),
        }
    }

    /// Rank r's element i: 16 significant bits, so sums of a few are exact only in the right order.
    fn input(r: usize, i: usize) -> f32 {
        let x = ((r * 7919 + i * 104_729) % 65_521) as f32;
        (x - 32_760.0) / 1024.0 + 1.0 / (1 + r + i % 5) as f32
    }

    /// Runs `f` on every rank of a world of `n` threads; returns the results in rank order.
    fn on_ranks<C: Send, R: Send>(rings: Vec<C>, f: impl Fn(usize, C) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(r, ring)| s.spawn(move || f(r, ring)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn uneven(len: usize, n: usize) -> Bounds {
        let mut offsets = vec![0];
        for r in 0..n {
            offsets.push((offsets[r] + len * (r + 1) / (n * (n + 1) / 2)).min(len));
        }
        offsets[n] = len;
        Bounds::new(offsets).unwrap()
    }

    /// Three tensors of a bucket with gaps between them (other buckets' elements, never touched).
    fn bucket(n: usize) -> (usize, Vec<Piece>) {
        let pieces = vec![
            Piece {
                start: 3,
                bounds: even_bounds(41, n),
            },
            Piece {
                start: 44,
                bounds: uneven(70, n),
            },
            Piece {
                start: 120,
                bounds: even_bounds(n.saturating_sub(1), n),
            },
        ];
        (130, pieces)
    }

    /// One launch over a bucket's tensors gives, per tensor, exactly what the thread ring gives for that
    /// tensor alone (the sum order of `schedule::sum_order`), bit for bit; elements outside the pieces are
    /// untouched; bf16 rounds the f32 sum once.
    #[test]
    fn a_bucket_in_one_table_sums_each_tensor_like_the_thread_ring() {
        for n in 1..=5 {
            let (span, pieces) = bucket(n);
            let twins = on_ranks(P2pTwin::new(n, small_opts()), |r, mut ring| {
                let mut f: Vec<f32> = (0..span).map(|i| input(r, i)).collect();
                let mut b: Vec<bf16> = (0..span).map(|i| bf16::from_f32(input(r, i))).collect();
                ring.reduce_scatter_pieces(&mut f, &pieces).unwrap();
                ring.reduce_scatter_pieces(&mut b, &pieces).unwrap();
                (f, b)
            });
            let threads = on_ranks(ThreadRing::new(n), |r, mut ring| {
                let mut out: Vec<f32> = (0..span).map(|i| input(r, i)).collect();
                for p in &pieces {
                    ring.reduce_scatter_sum(&mut out[p.start..p.end()], &p.bounds).unwrap();
                }
                out
            });
            for r in 0..n {
                let (f, b) = &twins[r];
                for p in &pieces {
                    for i in p.bounds.range(r) {
                        let at = p.start + i;
                        assert_eq!(
                            f[at].to_bits(),
                            threads[r][at].to_bits(),
                            "n{n} rank {r} f32 element {at}"
                        );
                        let mut order = sum_order(n, r);
                        let first = bf16::from_f32(input(order.next().unwrap(), at)).to_f32();
                        let want = order.fold(first, |a, q| a + bf16::from_f32(input(q, at)).to_f32());
                        assert_eq!(b[at], bf16::from_f32(want), "n{n} rank {r} bf16 element {at}");
                    }
                }
                for i in (0..span).filter(|&i| !pieces.iter().any(|p| (p.start..p.end()).contains(&i))) {
                    assert_eq!(f[i], input(r, i), "n{n} rank {r}: element {i} is outside every piece");
                    assert_eq!(b[i], bf16::from_f32(input(r, i)));
                }
                // bf16 leaves the non-owned elements of its pieces untouched
                for p in &pieces {
                    for i in (0..p.bounds.len()).filter(|i| !p.bounds.range(r).contains(i)) {
                        assert_eq!(b[p.start + i], bf16::from_f32(input(r, p.start + i)));
                    }
                }
            }
        }
    }

    #[test]
    fn a_bucket_all_gather_delivers_each_owners_part() {
        for n in 1..=5 {
            let (span, pieces) = bucket(n);
            let results = on_ranks(P2pTwin::new(n, small_opts()), |r, mut ring| {
                let mut f: Vec<f32> = (0..span).map(|i| input(r, i)).collect();
                let mut b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
                ring.all_gather_pieces(&mut f, &pieces).unwrap();
                ring.all_gather_pieces(&mut b, &pieces).unwrap();
                (f, b)
            });
            for (r, (f, b)) in results.iter().enumerate() {
                for i in 0..span {
                    let owner = pieces
                        .iter()
                        .find(|p| (p.start..p.end()).contains(&i))
                        .map(|p| (0..n).find(|&c| p.bounds.range(c).contains(&(i - p.start))).unwrap())
                        .unwrap_or(r);
                    assert_eq!(f[i], input(owner, i), "n{n} rank {r} element {i}");
                    assert_eq!(b[i], bf16::from_f32(input(owner, i)), "n{n} rank {r} element {i}");
                }
            }
        }
    }

    /// Small all-reduces take the one-shot path (rank-order sum), large ones the ring (its order), as on
    /// the GPU; all ranks end with the same bits.
    #[test]
    fn all_reduce_is_one_shot_below_the_threshold_and_the_ring_above() {
        let n = 3;
        let opts = small_opts();
        for len in [1usize, 16, 17, 200] {
            let one_shot = one_shot_fits(&opts, len, 4);
            assert_eq!(one_shot, len * 4 <= opts.one_shot_bytes);
            let results = on_ranks(P2pTwin::new(n, opts), |r, mut ring| {
                let mut buf: Vec<f32> = (0..len).map(|i| input(r, i)).collect();
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let bounds = even_bounds(len, n);
            for i in 0..len {
                let order: Vec<usize> = if one_shot {
                    (0..n).collect()
                } else {
                    sum_order(n, (0..n).find(|&c| bounds.range(c).contains(&i)).unwrap()).collect()
                };
                let want = order[1..].iter().fold(input(order[0], i), |a, &q| a + input(q, i));
                for (r, got) in results.iter().enumerate() {
                    assert_eq!(got[i].to_bits(), want.to_bits(), "len {len} rank {r} element {i}");
                }
            }
        }
    }

    /// Ranks whose tables do not pair up (one rank given other bounds) fail with an error naming the plan
    /// mismatch, instead of summing the wrong elements.
    #[test]
    fn ranks_with_different_pieces_fail_instead_of_mixing_elements() {
        let errors = on_ranks(P2pTwin::new(2, small_opts()), |r, mut ring| {
            let bounds = if r == 0 { even_bounds(40, 2) } else { uneven(40, 2) };
            let mut buf = vec![1.0f32; 40];
            ring.reduce_scatter_pieces(&mut buf, &[Piece { start: 0, bounds }])
                .err()
        });
        assert!(
            errors.iter().flatten().any(|e| e.reason.contains("different plans")),
            "{errors:?}"
        );
    }

    #[test]
    fn overlapping_or_misordered_pieces_are_refused() {
        let mut ring = P2pTwin::new(1, small_opts()).pop().unwrap();
        let mut buf = vec![0.0f32; 30];
        let p = |start, len| Piece {
            start,
            bounds: even_bounds(len, 1),
        };
        let e = ring.reduce_scatter_pieces(&mut buf, &[p(0, 10), p(5, 10)]).unwrap_err();
        assert!(e.reason.contains("without overlap"), "{e}");
        let e = ring.all_gather_pieces(&mut buf, &[p(25, 10)]).unwrap_err();
        assert!(e.reason.contains("span of 30"), "{e}");
    }
}
