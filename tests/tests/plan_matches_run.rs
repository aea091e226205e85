//! The plan prices exactly what a run allocates: parameters, grads, optimizer state and activations (a CPU
//! run's buffers), and Muon's scratch (the device optimizer's buffers; the host optimizer sizes its own with
//! the same `muon::scratch_dims`).

use nc_core::backend::cpu::CpuBackend;
use nc_core::config::ModelConfig;
use nc_core::model::{self, Gpt};
use nc_core::optim::device::DeviceOptimizer;
use nc_core::optim::{OptimConfig, Optimizer};
use nc_core::plan::{memory_per_gpu, Precision, Recompute};

#[test]
fn fp32_plan_equals_the_run_buffers() {
    let m = ModelConfig::new(3, 64, 4, 2, 16, 300, 32).unwrap();
    for (policy, engine) in [
        (Recompute::None, model::Recompute::None),
        (Recompute::Selective, model::Recompute::Selective),
        (Recompute::Full, model::Recompute::Full),
    ] {
        let batch = 3;
        let gpt = Gpt::new(CpuBackend::new(), m, batch, m.sequence_len, engine).unwrap();
        let opt = Optimizer::new(&m, OptimConfig::default(), 0, 1).unwrap();
        let plan = memory_per_gpu(&m, batch, 1, Precision::Fp32, policy);
        assert_eq!(plan.params, (4 * gpt.params().len()) as f64);
        assert_eq!(plan.grads, (4 * gpt.grads().len()) as f64);
        assert_eq!(plan.optimizer_state, (4 * opt.state().len()) as f64);
        // the device optimizer allocates exactly the scratch the plan prices
        let be = CpuBackend::new();
        let dev = DeviceOptimizer::new(&be, &m, OptimConfig::default()).unwrap();
        assert_eq!(plan.optimizer_scratch, (4 * dev.scratch_elements()) as f64);
        assert_eq!(plan.master_weights, 0.0);
        assert_eq!(
            plan.activations + plan.loss_workspace,
            (4 * gpt.layout.total) as f64,
            "{policy:?}"
        );
    }
}
