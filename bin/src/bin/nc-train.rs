//! nc-train: trains a nanochat-style GPT. With no arguments, runs the embedded default on the CPU.

use nc_core::config::{ModelConfig, PRESETS};

fn main() {
    // Interim entry point until the training loop lands (issue 4): prints the presets' shapes.
    println!(
        "{:<6} {:>6} {:>6} {:>6} {:>16} {:>14}",
        "preset", "depth", "d", "heads", "params", "flops/token"
    );
    for (name, depth) in PRESETS {
        let c = ModelConfig::from_depth(*depth).expect("presets are valid");
        println!(
            "{:<6} {:>6} {:>6} {:>6} {:>16} {:>14.3e}",
            name,
            depth,
            c.n_embd,
            c.n_head,
            c.num_params(),
            c.flops_per_token()
        );
    }
}
