//! Optimizers: Muon for block matrices, AdamW for embeddings, the lr schedule (issue 4).
