//! The vocabulary the planner, the model and the optimizer share: the precision policy of a run's buffers and
//! the byte units sizes are printed in.
//!
//! A leaf on purpose: the model (`model::Storages`) and the device optimizer choose storages by `Precision`,
//! and the planner (`plan`, `plan_comm`) prices the model's and the optimizer's layouts. With `Precision`
//! in the planner they imported each other in a circle; here nothing imports back
//! (`tests/tests/import_cycles.rs` fails on any circle of `use crate::` imports).

use crate::bail;
use crate::error::Result;
use serde::Serialize;

pub const GB: f64 = 1e9;
pub const GIB: f64 = (1u64 << 30) as f64;

/// Numeric formats of the run's buffers, and where they live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// CPU: f32 everywhere, no separate master weights.
    #[default]
    Fp32,
    /// GPU, f32 everywhere, as this build's CUDA backend runs: the CPU's buffers plus the CUDA context.
    #[serde(rename = "fp32-gpu")]
    Fp32Gpu,
    /// bf16 working weights and activations for compute, fp32 grads, fp32 master weights and optimizer
    /// state (both sharded over ranks, ZeRO-1); `model::Storages` says which buffer is which. The CPU
    /// backend runs it as the twin (`--backend cpu --precision bf16`); the CUDA engine is being built.
    Bf16,
}

impl Precision {
    /// Bytes an element of the working weights (the copy every GEMM reads).
    pub fn param_bytes(self) -> f64 {
        match self {
            Precision::Fp32 | Precision::Fp32Gpu => 4.0,
            Precision::Bf16 => 2.0,
        }
    }
    /// Bytes of one f32 master weight an element; zero where the working copy is the master.
    pub fn master_bytes(self) -> f64 {
        match self {
            Precision::Fp32 | Precision::Fp32Gpu => 0.0,
            Precision::Bf16 => 4.0,
        }
    }
    /// What the plan's header calls it.
    pub fn label(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp32Gpu => "fp32 (this build's CUDA backend)",
            Precision::Bf16 => "bf16 (the target engine)",
        }
    }
    /// Parses a `--precision` value: fp32 or bf16 (fp32 on a GPU is `Fp32Gpu`: see `on_gpu`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => bail!("--precision '{s}' is not one of fp32, bf16"),
        }
    }
    /// The same precision as a GPU run has it (fp32 on a GPU also pays the CUDA context).
    pub fn on_gpu(self) -> Self {
        match self {
            Precision::Fp32 | Precision::Fp32Gpu => Precision::Fp32Gpu,
            Precision::Bf16 => Precision::Bf16,
        }
    }
}
