//! nc-comm: Collectives: the Collective trait, an in-process thread ring, CUDA peer-to-peer ring, NCCL.
