//! Checkpoints: safetensors weights with nanochat names, meta.json, optimizer state; crash-safe (issue 4).
