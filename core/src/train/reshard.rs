//! Optimizer state across world sizes: a checkpoint holds one state buffer per rank of the run that saved it
//! (`optim::shard::ShardLayout`: whole Muon matrices round-robin, AdamW row slices); a run resumed at another
//! world size builds each new rank's buffer from the pieces of the saved ones that cover what it now owns.
//!
//! Every element of the logical state (a matrix's Muon momentum, an AdamW parameter's m and v) has exactly
//! one owner at any world size, so the new buffers are a permutation of the old ones' values: nothing is
//! averaged or recomputed, and resharding back gives the old buffers bit for bit.

use crate::bail;
use crate::config::{ModelConfig, ParamKind};
use crate::error::Result;
use crate::optim::shard::{Segment, ShardLayout};
use std::ops::Range;

/// The overlap of two element ranges of the parameter buffer, if any.
fn overlap(a: Range<usize>, b: Range<usize>) -> Option<Range<usize>> {
    let (lo, hi) = (a.start.max(b.start), a.end.min(b.end));
    (lo < hi).then_some(lo..hi)
}

/// Copy the state of parameter elements `elems` from an old rank's segment into a new rank's segment (both of
/// the same parameter, both holding `elems`). Muon's momentum is one value per element; AdamW keeps m for the
/// whole segment, then v.
fn copy_piece(new_seg: &Segment, new_state: &mut [f32], old_seg: &Segment, old_state: &[f32], elems: Range<usize>) {
    let n = elems.len();
    let at_new = new_seg.state_offset + (elems.start - new_seg.start);
    let at_old = old_seg.state_offset + (elems.start - old_seg.start);
    new_state[at_new..at_new + n].copy_from_slice(&old_state[at_old..at_old + n]);
    if new_seg.kind != ParamKind::Matrix {
        let (v_new, v_old) = (at_new + new_seg.len, at_old + old_seg.len);
        new_state[v_new..v_new + n].copy_from_slice(&old_state[v_old..v_old + n]);
    }
}

/// Rank `rank` of `world_size`'s optimizer state, from the states of a run of `old_world_size` ranks.
/// `load_old(r)` reads old rank r's buffer (called at most once per old rank, only for ranks that hold part
/// of what `rank` owns now).
pub fn reshard_state(
    model: &ModelConfig,
    old_world_size: usize,
    rank: usize,
    world_size: usize,
    load_old: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let new = ShardLayout::new(model, rank, world_size);
    let mut state = vec![0.0f32; new.state_len];
    let mut filled = 0usize;
    for old_rank in 0..old_world_size {
        let old = ShardLayout::new(model, old_rank, old_world_size);
        let mut old_state: Option<Vec<f32>> = None;
        for new_seg in &new.segments {
            for old_seg in old.segments.iter().filter(|s| s.param_index == new_seg.param_index) {
                let Some(elems) = overlap(new_seg.range(), old_seg.range()) else {
                    continue;
                };
                if old_state.is_none() {
                    let st = load_old(old_rank)?;
                    if st.len() != old.state_len {
                        bail!(
                            "optimizer state of rank {old_rank} of {old_world_size} has {} values, its layout needs \
                             {}; the checkpoint is corrupt",
                            st.len(),
                            old.state_len
                        );
                    }
                    old_state = Some(st);
                }
                let old_st = old_state.as_deref().expect("loaded just above");
                copy_piece(new_seg, &mut state, old_seg, old_st, elems.clone());
                filled += if new_seg.kind == ParamKind::Matrix {
                    elems.len()
                } else {
                    2 * elems.len()
                };
            }
        }
    }
    // the old ranks partition the parameters, so together they cover what this rank owns exactly once
    if filled != new.state_len {
        bail!(
            "resharding the optimizer state of {old_world_size} ranks for rank {rank} of {world_size} covered {filled} \
             of {} values; the checkpoint does not match this model",
            new.state_len
        );
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        // 3 layers: 18 matrices, so round-robin ownership is uneven at 4 and 5 ranks; 37 vocabulary rows split
        // unevenly too
        ModelConfig::new(3, 32, 2, 2, 16, 37, 8).unwrap()
    }

    /// The value a logical state element holds in these tests: which parameter, which element of it, which
    /// moment (0: Muon momentum or AdamW m, 1: AdamW v). Exact in f32 for this model's sizes.
    fn tag(param: usize, elem: usize, moment: usize) -> f32 {
        (param * 10_000 + elem * 2 + moment) as f32
    }

    /// A rank's state filled from `tag`, written from the layout's definition (not from `reshard_state`).
    fn tagged_state(model: &ModelConfig, rank: usize, world: usize) -> Vec<f32> {
        let specs = model.param_specs();
        let l = ShardLayout::new(model, rank, world);
        let mut st = vec![f32::NAN; l.state_len];
        for s in &l.segments {
            let first = s.start - specs[s.param_index].offset;
            for i in 0..s.len {
                st[s.state_offset + i] = tag(s.param_index, first + i, 0);
                if s.kind != ParamKind::Matrix {
                    st[s.state_offset + s.len + i] = tag(s.param_index, first + i, 1);
                }
            }
        }
        st
    }

    #[test]
    fn every_rank_gets_the_state_of_what_it_now_owns() {
        let m = tiny();
        for old_world in 1..=5usize {
            let old: Vec<Vec<f32>> = (0..old_world).map(|r| tagged_state(&m, r, old_world)).collect();
            for world in 1..=5usize {
                for rank in 0..world {
                    let mut loads = vec![0; old_world];
                    let got = reshard_state(&m, old_world, rank, world, &mut |r| {
                        loads[r] += 1;
                        Ok(old[r].clone())
                    })
                    .unwrap();
                    let want = tagged_state(&m, rank, world);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{old_world} -> rank {rank} of {world}"
                    );
                    assert!(loads.iter().all(|&n| n <= 1), "each old rank read at most once");
                }
            }
        }
    }

    #[test]
    fn a_wrong_sized_old_state_is_an_error() {
        let m = tiny();
        let e = reshard_state(&m, 2, 0, 1, &mut |r| Ok(vec![0.0; 3 + r])).unwrap_err();
        assert!(e.message.contains("corrupt"), "{e}");
    }
}
