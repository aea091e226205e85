//! The GPT, written once against the `Backend` trait: one file per layer kind (issue 2).
