//! Sampling from a model: KV-cached generation, greedy and temperature/top-k (issue 2).
