//! The training loop with nanochat semantics (issue 4).
