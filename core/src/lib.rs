//! nc-core: the engine. One module per concern; see ARCHITECTURE.md for the map.

pub mod error;
pub mod config;
pub mod plan;
pub mod backend;
pub mod model;
pub mod optim;
pub mod data;
pub mod checkpoint;
pub mod sample;
pub mod train;

pub use config::ModelConfig;
pub use error::{NcError, Result};
