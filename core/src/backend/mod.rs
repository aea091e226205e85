//! The `Backend` trait: the operations the model is written against; CPU and CUDA implement it (issue 2).
