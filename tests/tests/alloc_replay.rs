//! Replay of a training step's device allocations through the caching allocator, 1,000 steps: after the
//! first step the cache must serve every request (zero new segments), with no flush and no growth.
//!
//! The trace is generated from the model shape (`ModelConfig::param_specs()` and the activation sizes of
//! a B x T micro-batch), following the flow of DESIGN.md: persistent buffers (params, grads, optimizer
//! state) allocated once; per step, the forward keeps each layer's activations for the backward, the loss
//! runs over chunks of rows (the full logits never exist), the backward frees each layer's activations
//! as it goes, and the optimizer takes per-matrix Newton-Schulz workspaces.

use nc_alloc::{AllocatorConfig, CachingAllocator, HostSource, StreamId};
use nc_core::config::{ModelConfig, ParamKind};

const BF16: usize = 2;
const F32: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Event {
    Alloc { id: usize, bytes: usize },
    Free { id: usize },
}

struct Trace {
    events: Vec<Event>,
    next_id: usize,
}

impl Trace {
    fn alloc(&mut self, bytes: usize) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        self.events.push(Event::Alloc { id, bytes });
        id
    }
    fn free(&mut self, id: usize) {
        self.events.push(Event::Free { id });
    }
    /// A temporary: allocated and freed at once (a kernel workspace).
    fn scratch(&mut self, bytes: usize) {
        let id = self.alloc(bytes);
        self.free(id);
    }
}

/// Persistent buffer sizes (kept across steps) and one step's events, for `cfg` at micro-batch b x t.
fn training_trace(cfg: &ModelConfig, b: usize, t: usize) -> (Vec<usize>, Vec<Event>) {
    let specs = cfg.param_specs();
    let n = cfg.num_params() as usize;
    let (d, v, h) = (cfg.n_embd, cfg.vocab_size, cfg.n_head);
    let qd = cfg.n_head * cfg.head_dim;
    let kvd = cfg.kv_dim();
    let rows = b * t;
    let adamw: usize = specs
        .iter()
        .filter(|p| p.kind != ParamKind::Matrix)
        .map(|p| p.numel())
        .sum();
    let muon: usize = specs
        .iter()
        .filter(|p| p.kind == ParamKind::Matrix)
        .map(|p| p.numel())
        .sum();
    let persistent = vec![
        n * F32,                // parameters (master copy)
        n * BF16,               // parameters in bf16 for the matmuls
        n * F32,                // gradients
        2 * adamw * F32,        // AdamW first and second moments
        muon * F32,             // Muon momentum
        b * (t + 1) * F32,      // token ids of the micro-batch
        t * cfg.head_dim * F32, // rotary cos and sin tables
    ];

    let mut tr = Trace {
        events: Vec::new(),
        next_id: 0,
    };
    let x0 = tr.alloc(rows * d * F32); // embedding output, the first residual
    let mut saved: Vec<Vec<usize>> = Vec::new();
    let mut residual = x0;
    for _layer in 0..cfg.n_layer {
        let ln1 = tr.alloc(rows * d * BF16);
        let q = tr.alloc(rows * qd * BF16);
        let k = tr.alloc(rows * kvd * BF16);
        let vv = tr.alloc(rows * kvd * BF16);
        tr.scratch(b * h * 64 * 64 * F32); // attention tile workspace
        let att = tr.alloc(rows * qd * BF16);
        let lse = tr.alloc(b * h * t * F32);
        let x_attn = tr.alloc(rows * d * F32);
        let ln2 = tr.alloc(rows * d * BF16);
        let fc = tr.alloc(rows * 4 * d * BF16);
        let act = tr.alloc(rows * 4 * d * BF16);
        let x_out = tr.alloc(rows * d * F32);
        saved.push(vec![ln1, q, k, vv, att, lse, x_attn, ln2, fc, act, residual]);
        residual = x_out;
    }
    // Loss: final norm, then lm_head + softcap + cross-entropy over chunks of rows.
    let ln_f = tr.alloc(rows * d * BF16);
    let dx = tr.alloc(rows * d * F32);
    let chunk_rows = (rows / 8).max(1);
    for _ in 0..rows.div_ceil(chunk_rows) {
        let logits = tr.alloc(chunk_rows * v * F32);
        let losses = tr.alloc(chunk_rows * F32);
        tr.scratch(chunk_rows * F32); // row maxima
        tr.free(losses);
        tr.free(logits);
    }
    let loss = tr.alloc(F32);
    tr.free(ln_f);
    tr.free(residual);
    // Backward, last layer first: each layer's activation grads, then its saved activations go.
    let mut d_resid = dx;
    for layer_saved in saved.into_iter().rev() {
        let d_act = tr.alloc(rows * 4 * d * BF16);
        let d_fc = tr.alloc(rows * 4 * d * BF16);
        let d_ln2 = tr.alloc(rows * d * F32);
        tr.free(d_act);
        tr.free(d_fc);
        let d_att = tr.alloc(rows * qd * BF16);
        let d_q = tr.alloc(rows * qd * BF16);
        let d_k = tr.alloc(rows * kvd * BF16);
        let d_v = tr.alloc(rows * kvd * BF16);
        tr.scratch(b * h * t * F32); // softmax row sums
        let d_ln1 = tr.alloc(rows * d * F32);
        for id in [d_att, d_q, d_k, d_v, d_ln2] {
            tr.free(id);
        }
        let d_in = tr.alloc(rows * d * F32);
        tr.free(d_ln1);
        tr.free(d_resid);
        d_resid = d_in;
        for id in layer_saved {
            tr.free(id);
        }
    }
    tr.free(d_resid);
    // Clip by the global norm: one partial sum per parameter, then the scalar.
    let partials = tr.alloc(specs.len() * F32);
    tr.scratch(F32);
    tr.free(partials);
    // Muon: Newton-Schulz on each matrix (bf16 copy, X X^T, and the polynomial's product).
    for p in specs.iter().filter(|p| p.kind == ParamKind::Matrix) {
        let m = p.rows.min(p.cols);
        let x = tr.alloc(p.numel() * BF16);
        let a = tr.alloc(m * m * BF16);
        let bb = tr.alloc(m * m * BF16);
        tr.scratch(p.numel() * BF16);
        tr.free(bb);
        tr.free(a);
        tr.free(x);
    }
    tr.free(loss);
    (persistent, tr.events)
}

fn replay(cfg: &ModelConfig, b: usize, t: usize, steps: usize) {
    let (persistent, step) = training_trace(cfg, b, t);
    let ids = step.iter().filter(|e| matches!(e, Event::Alloc { .. })).count();
    assert!(ids > 300, "trace too small to mean anything: {ids} allocations");
    let stream = StreamId(7);
    let alloc = CachingAllocator::new(HostSource::unbacked(80 << 30), AllocatorConfig::default()).unwrap();
    let kept: Vec<_> = persistent
        .iter()
        .map(|&bytes| alloc.allocate(bytes, stream).unwrap())
        .collect();
    let base = alloc.stats().allocated_bytes;
    let mut slots: Vec<Option<nc_alloc::DeviceBlock>> = (0..step.len()).map(|_| None).collect();
    let mut segments_after_first = 0;
    let mut reserved_after_first = 0;
    for s in 0..steps {
        for e in &step {
            match *e {
                Event::Alloc { id, bytes } => slots[id] = Some(alloc.allocate(bytes, stream).unwrap()),
                Event::Free { id } => alloc.free(slots[id].take().expect("trace frees a block twice")),
            }
        }
        let st = alloc.stats();
        assert_eq!(st.allocated_bytes, base, "step {s} leaked device memory");
        if s == 0 {
            segments_after_first = st.num_segment_allocs;
            reserved_after_first = st.reserved_bytes;
            eprintln!("after step 1 of {}:\n{}", cfg.model_tag(), alloc.summary());
        } else {
            assert_eq!(
                st.num_segment_allocs,
                segments_after_first,
                "step {} asked the device for new segments:\n{}",
                s + 1,
                alloc.summary()
            );
        }
    }
    let st = alloc.stats();
    assert_eq!(st.reserved_bytes, reserved_after_first);
    assert_eq!((st.num_cache_flushes, st.num_ooms, st.num_segment_frees), (0, 0, 0));
    assert_eq!(st.num_allocs, (persistent.len() + ids * steps) as u64);
    alloc.check_consistency().unwrap();
    eprintln!("after {steps} steps:\n{}", alloc.summary());
    for block in kept {
        alloc.free(block);
    }
}

#[test]
fn a_d20_training_step_replays_1000_times_with_no_new_segments() {
    let cfg = ModelConfig::preset("d20").unwrap();
    replay(&cfg, 8, 2048, 1000);
}

#[test]
fn a_gqa_model_with_short_sequences_replays_with_no_new_segments() {
    // A different mix of sizes: grouped kv heads, small vocab, short T (more small-pool traffic).
    let cfg = ModelConfig::from_depth(12)
        .unwrap()
        .with_kv_heads(2)
        .unwrap()
        .with_vocab_size(32768)
        .unwrap();
    replay(&cfg, 4, 512, 1000);
}
