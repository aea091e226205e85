//! nc-kernels: CUDA C kernel sources, their checked-in PTX, and the Rust module exposing each PTX text.
