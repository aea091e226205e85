//! The memory plan: per-GPU bytes for every buffer of a run, recomputation policy, time and cost (issue 4).
