//! Data: tokenizer, token shards, the loader, data preparation, the embedded corpus (issue 3).
