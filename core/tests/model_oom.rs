//! A model that does not fit is an error, not a panic: `Gpt::with_precision` allocates every buffer through
//! `Backend::try_alloc_as` and hands the backend's out-of-memory report back unchanged.
//!
//! `Budgeted` is the CPU backend with a byte budget: an allocation that would pass it fails with a report
//! (the role of the CUDA caching allocator's OOM report), and its plain `alloc`/`alloc_as` panic past the
//! budget, as the CUDA backend's do. Each budget of the sweep makes a different allocation of the model's
//! construction the first to fail, so an allocation made with `alloc_as` instead of `try_alloc_as` anywhere
//! in construction panics here.

use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::{Backend, Storage};
use nc_core::error::{NcError, Result};
use nc_core::model::{Gpt, Recompute};
use nc_core::plan::Precision;
use nc_core::ModelConfig;
use std::sync::Mutex;

/// Bytes used and the sizes of every allocation so far (what the sweep replays).
#[derive(Default)]
struct Ledger {
    used: usize,
    sizes: Vec<usize>,
}

struct Budgeted {
    inner: CpuBackend,
    budget: usize,
    ledger: Mutex<Ledger>,
}

impl Budgeted {
    fn new(budget: usize) -> Self {
        Budgeted {
            inner: CpuBackend::new(),
            budget,
            ledger: Mutex::new(Ledger::default()),
        }
    }
    /// Counts `len` elements of `storage` (at least one, as the device allocator does) against the budget.
    fn charge(&self, len: usize, storage: Storage) -> Result<()> {
        let bytes = len.max(1) * storage.bytes_per_element();
        let mut l = self.ledger.lock().unwrap();
        if l.used + bytes > self.budget {
            return Err(NcError::new(format!(
                "budget report: out of memory at allocation #{}: tried to allocate {bytes} bytes with {} of {} \
                 in use",
                l.sizes.len(),
                l.used,
                self.budget
            )));
        }
        l.used += bytes;
        l.sizes.push(bytes);
        Ok(())
    }
}

/// Allocations are charged to the budget; every other op goes to the CPU backend (`Delegate` forwards it).
impl nc_core::backend::delegate::Delegate for Budgeted {
    type Inner = CpuBackend;
    fn inner(&self) -> &CpuBackend {
        &self.inner
    }
    fn alloc(&self, len: usize) -> CpuBuf {
        Backend::alloc_as(self, len, Storage::F32)
    }
    fn alloc_as(&self, len: usize, storage: Storage) -> CpuBuf {
        Backend::try_alloc_as(self, len, storage).unwrap_or_else(|e| panic!("{e}"))
    }
    fn try_alloc_as(&self, len: usize, storage: Storage) -> Result<CpuBuf> {
        self.charge(len, storage)?;
        Ok(self.inner.alloc_as(len, storage))
    }
}

fn cfg() -> ModelConfig {
    // 2 layers, d 64, 4 heads of 16 (2 kv heads), vocab 97, T 16
    ModelConfig::new(2, 64, 4, 2, 16, 97, 16).unwrap()
}

/// Sizes of every allocation of a model's construction, from a run with room to spare.
fn allocation_sizes(precision: Precision, policy: Recompute) -> Vec<usize> {
    let be = Budgeted::new(usize::MAX);
    let m = Gpt::with_precision(be, cfg(), 2, 16, policy, precision).expect("fits");
    let sizes = m.be.ledger.lock().unwrap().sizes.clone();
    sizes
}

#[test]
fn every_construction_allocation_past_the_budget_is_an_error_with_the_report() {
    for precision in [Precision::Bf16, Precision::Fp32] {
        for policy in [Recompute::None, Recompute::Full] {
            let sizes = allocation_sizes(precision, policy);
            assert!(sizes.len() > 30, "{} allocations", sizes.len());
            let mut used = 0;
            for (k, &bytes) in sizes.iter().enumerate() {
                // Room for allocations 0..k exactly: #k is the first that does not fit.
                let be = Budgeted::new(used);
                let err = match Gpt::with_precision(be, cfg(), 2, 16, policy, precision) {
                    Ok(_) => panic!("{precision:?} {policy:?}: a budget of {used} bytes built the model"),
                    Err(e) => e.to_string(),
                };
                let want = format!("budget report: out of memory at allocation #{k}: tried to allocate {bytes} bytes");
                assert!(err.contains(&want), "{precision:?} {policy:?}: {err}");
                used += bytes;
            }
            // And with exactly the total it fits.
            let be = Budgeted::new(used);
            assert!(Gpt::with_precision(be, cfg(), 2, 16, policy, precision).is_ok());
        }
    }
}
