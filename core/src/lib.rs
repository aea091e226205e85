//! nc-core: the engine. One module per concern; see ARCHITECTURE.md for the map.

pub mod backend;
pub mod checkpoint;
pub mod checkpoint_sums;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod model;
pub mod nvtx;
pub mod optim;
pub mod plan;
pub mod plan_comm;
pub mod precision;
pub mod sample;
pub mod train;

pub use config::ModelConfig;
pub use error::{NcError, Result};
