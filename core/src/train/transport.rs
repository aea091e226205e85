//! Which transport carries a multi-rank run's collectives (`--comm auto|ring|nccl`), and why.
//!
//! - CPU backend: the shared-memory ring between the processes of one machine (`--comm nccl` is refused).
//! - CUDA, ranks on several nodes: NCCL (the peer-to-peer ring only reaches GPUs of one node).
//! - CUDA, one node, `auto`: nc's peer-to-peer ring (`nc_comm::P2pRing`: one-shot all-reduce up to its
//!   threshold, reduce-scatter + all-gather rings above) when every pair of GPUs can reach each other
//!   (`nc_comm::p2p_support`, agreed by all ranks), else NCCL, saying why. `ring` insists on the P2P ring
//!   (an error naming what is missing), `nccl` on NCCL.
//! - One rank: no collective.
//!
//! The P2P ring carries the device ZeRO-1 exchange (`zero1_p2p::P2pExchange`). With `--comm ring`, ranks may
//! share GPUs (`gpu_for_rank`): how a one-GPU machine checks the ring's correctness; NCCL keeps one rank a GPU.
//!
//! The P2P ring is UNVERIFIED (never run on a GPU); `auto` picks it all the same inside a node, since that
//! is the design, and `--comm nccl` is the way around it until scripts/gpu_check.sh's `p2p` step has passed.

use crate::error::{NcError, Result};
use std::fmt;

/// The `--comm` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommFlag {
    Auto,
    Ring,
    Nccl,
}

impl CommFlag {
    pub fn parse(value: &str) -> Result<CommFlag> {
        match value {
            "auto" => Ok(CommFlag::Auto),
            "ring" => Ok(CommFlag::Ring),
            "nccl" => Ok(CommFlag::Nccl),
            other => Err(NcError::new(format!(
                "--comm {other:?}: expected auto (the ring inside a node, NCCL across nodes), ring or nccl"
            ))),
        }
    }
}

/// The transport a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One rank: nothing to communicate.
    None,
    /// The CPU backend's shared-memory ring (`nc_comm::ShmRing`).
    ShmRing,
    /// nc's CUDA IPC peer-to-peer ring (`nc_comm::P2pRing`).
    P2pRing,
    /// NCCL (`nc_comm::NcclRing`).
    Nccl,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::None => "none",
            Transport::ShmRing => "shared-memory ring",
            Transport::P2pRing => "peer-to-peer ring",
            Transport::Nccl => "NCCL",
        })
    }
}

/// What was chosen and why (one line for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub transport: Transport,
    pub reason: String,
}

impl Choice {
    pub fn line(&self) -> String {
        format!("comm: {} ({})", self.transport, self.reason)
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub on_cuda: bool,
    pub world_size: usize,
    /// Ranks on this node (LOCAL_WORLD_SIZE).
    pub local_world_size: usize,
}

/// Picks the transport; prints the choice (one line) when `announce`. `probe_p2p` is called only when the
/// answer depends on it (CUDA, one node, `auto` or `ring`), on every rank alike (it goes through the
/// rendezvous): Ok(None) when every pair of GPUs can reach each other, Ok(Some(why not)) otherwise.
/// `one_shot_bytes` is the P2P ring's one-shot threshold, for the line.
pub fn choose_transport(
    flag: CommFlag,
    at: Placement,
    one_shot_bytes: usize,
    probe_p2p: &mut dyn FnMut() -> Result<Option<String>>,
    announce: bool,
) -> Result<Choice> {
    let choice = decide(flag, at, one_shot_bytes, probe_p2p)?;
    if announce {
        println!("{}", choice.line());
    }
    Ok(choice)
}

fn decide(
    flag: CommFlag,
    at: Placement,
    one_shot_bytes: usize,
    probe_p2p: &mut dyn FnMut() -> Result<Option<String>>,
) -> Result<Choice> {
    let choice = |transport, reason: String| Ok(Choice { transport, reason });
    if !at.on_cuda {
        if flag == CommFlag::Nccl {
            return Err(NcError::new(
                "--comm nccl needs --backend cuda: the CPU backend's ranks use the shared-memory ring (--comm auto)",
            ));
        }
        if at.world_size <= 1 {
            return choice(Transport::None, "one rank".into());
        }
        if at.world_size > at.local_world_size {
            return Err(NcError::new(format!(
                "the CPU backend's shared-memory ring runs on one machine, but WORLD_SIZE={} spans nodes \
                 (LOCAL_WORLD_SIZE={})",
                at.world_size, at.local_world_size
            )));
        }
        return choice(
            Transport::ShmRing,
            format!("CPU backend, {} processes on this machine", at.world_size),
        );
    }
    if at.world_size <= 1 {
        return choice(Transport::None, "one rank".into());
    }
    let across_nodes = at.world_size > at.local_world_size;
    match flag {
        CommFlag::Nccl => choice(Transport::Nccl, "--comm nccl".into()),
        CommFlag::Ring if across_nodes => Err(NcError::new(format!(
            "--comm ring: the peer-to-peer ring runs inside one node, but WORLD_SIZE={} spans nodes \
             (LOCAL_WORLD_SIZE={}); use --comm auto or nccl",
            at.world_size, at.local_world_size
        ))),
        CommFlag::Auto if across_nodes => choice(
            Transport::Nccl,
            format!(
                "{} ranks over several nodes ({} a node): NCCL between nodes",
                at.world_size, at.local_world_size
            ),
        ),
        CommFlag::Ring | CommFlag::Auto => match probe_p2p()? {
            None => choice(
                Transport::P2pRing,
                format!(
                    "{} GPUs of one node with peer-to-peer access: one-shot all-reduce up to {} KiB, ring above{}",
                    at.world_size,
                    one_shot_bytes >> 10,
                    if flag == CommFlag::Ring { "; --comm ring" } else { "" }
                ),
            ),
            Some(why) if flag == CommFlag::Ring => Err(NcError::new(format!(
                "--comm ring: the peer-to-peer ring cannot run: {why}; use --comm nccl or auto"
            ))),
            Some(why) => choice(Transport::Nccl, format!("no peer-to-peer ring: {why}; NCCL instead")),
        },
    }
}

/// The GPU local rank `local_rank` of `local_world_size` trains on, with `gpus` visible: GPU `local_rank`,
/// one rank a GPU, as NCCL needs (more ranks than GPUs is refused, saying so). With `--comm ring` ranks may
/// share GPUs (local rank i on GPU i mod gpus): CUDA IPC between processes on one GPU works, so a one-GPU
/// machine can run the peer-to-peer ring with several ranks; the second value is then the line to print
/// (it checks correctness, not NVLink speed).
pub fn gpu_for_rank(
    flag: CommFlag,
    local_rank: usize,
    local_world_size: usize,
    gpus: usize,
) -> Result<(usize, Option<String>)> {
    if flag != CommFlag::Ring || gpus == 0 || local_world_size <= gpus {
        crate::train::launch::check_gpus_for_ranks(local_world_size, gpus).map_err(|e| {
            if gpus > 0 {
                NcError::new(format!(
                    "{}; or, to check correctness on fewer GPUs, --comm ring: ranks share GPUs over the peer-to-peer \
                     ring",
                    e.message
                ))
            } else {
                e
            }
        })?;
        return Ok((local_rank, None));
    }
    Ok((
        local_rank % gpus,
        Some(format!(
            "{local_world_size} ranks share {gpus} GPU(s) (local rank i on GPU i mod {gpus}) over the peer-to-peer \
             ring: this checks correctness, not NVLink speed"
        )),
    ))
}

/// The P2P ring's options for this run: the defaults, the one-shot threshold from `NC_P2P_ONE_SHOT_BYTES`
/// if set, and a kernel wait as long as a collective may take (rank 0 evaluates and saves while the others
/// wait in the next collective; a dead peer is found by the watchdog, not this timeout).
pub fn p2p_options() -> Result<nc_comm::P2pOptions> {
    let opts = nc_comm::P2pOptions {
        timeout: std::time::Duration::from_secs(1800),
        ..nc_comm::P2pOptions::default()
    };
    opts.with_env_overrides().map_err(NcError::from)
}

/// The P2P verdict of this run's ranks (`nc_comm::p2p_support` on GPU `gpu`'s primary context): every rank
/// calls it, as `choose_transport`'s probe.
pub fn probe_p2p(rank: usize, gpu: usize, rdv: &mut nc_comm::Rendezvous) -> Result<Option<String>> {
    let ctx = cudarc::driver::CudaContext::new(gpu)
        .map_err(|e| NcError::at_rank(rank, format!("GPU {gpu} for the P2P probe: {e:?}")))?;
    nc_comm::p2p_support(rdv, &ctx).map_err(NcError::from)
}

/// Joins the peer-to-peer ring on a new stream in the backend's context (its own communication stream, so
/// the ring's kernels overlap the compute stream's backward). UNVERIFIED: not yet run on a GPU.
pub fn join_p2p(
    rank: usize,
    be: &crate::backend::cuda::CudaBackend,
    rdv: &mut nc_comm::Rendezvous,
    opts: nc_comm::P2pOptions,
) -> Result<nc_comm::P2pRing> {
    let stream = crate::train::zero1_nccl::NcclExchange::comm_stream(be).map_err(|e| e.with_rank(rank))?;
    crate::nvtx::name_cuda_stream(stream.cu_stream() as *mut std::ffi::c_void, "nc p2p ring");
    nc_comm::P2pRing::join(rdv, stream, opts).map_err(NcError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU4: Placement = Placement {
        on_cuda: false,
        world_size: 4,
        local_world_size: 4,
    };
    const NODE8: Placement = Placement {
        on_cuda: true,
        world_size: 8,
        local_world_size: 8,
    };
    const TWO_NODES: Placement = Placement {
        on_cuda: true,
        world_size: 16,
        local_world_size: 8,
    };

    fn no_probe() -> Result<Option<String>> {
        panic!("the P2P probe must not run here")
    }

    fn pick(flag: CommFlag, at: Placement, p2p: Option<&str>) -> Result<Choice> {
        let mut probes = 0;
        let needed = at.on_cuda && at.world_size > 1 && at.world_size <= at.local_world_size;
        let mut probe = || {
            probes += 1;
            Ok(p2p.map(str::to_string))
        };
        let r = choose_transport(flag, at, 256 << 10, &mut probe, false);
        assert!(probes <= 1 && (probes == 0 || needed), "probed {probes} times");
        r
    }

    #[test]
    fn the_flag_parses_and_rejects_others_by_name() {
        assert_eq!(CommFlag::parse("auto").unwrap(), CommFlag::Auto);
        assert_eq!(CommFlag::parse("ring").unwrap(), CommFlag::Ring);
        assert_eq!(CommFlag::parse("nccl").unwrap(), CommFlag::Nccl);
        let e = CommFlag::parse("mpi").unwrap_err().to_string();
        assert!(e.contains("--comm \"mpi\"") && e.contains("auto"), "{e}");
    }

    #[test]
    fn the_cpu_backend_uses_the_shared_memory_ring() {
        for flag in [CommFlag::Auto, CommFlag::Ring] {
            let c = choose_transport(flag, CPU4, 1, &mut no_probe, false).unwrap();
            assert_eq!(c.transport, Transport::ShmRing);
        }
        let e = choose_transport(CommFlag::Nccl, CPU4, 1, &mut no_probe, false).unwrap_err();
        assert!(e.to_string().contains("--backend cuda"), "{e}");
        let spread = Placement {
            local_world_size: 2,
            ..CPU4
        };
        assert!(choose_transport(CommFlag::Auto, spread, 1, &mut no_probe, false).is_err());
    }

    #[test]
    fn one_rank_needs_nothing() {
        for on_cuda in [false, true] {
            let at = Placement {
                on_cuda,
                world_size: 1,
                local_world_size: 1,
            };
            for flag in [CommFlag::Auto, CommFlag::Ring] {
                let c = choose_transport(flag, at, 1, &mut no_probe, false).unwrap();
                assert_eq!(c.transport, Transport::None);
            }
        }
    }

    #[test]
    fn inside_a_node_auto_takes_the_ring_when_p2p_works_and_nccl_otherwise() {
        let c = pick(CommFlag::Auto, NODE8, None).unwrap();
        assert_eq!(c.transport, Transport::P2pRing);
        assert!(c.line().contains("one-shot all-reduce up to 256 KiB"), "{}", c.line());
        let c = pick(CommFlag::Auto, NODE8, Some("rank 3's GPU is not visible")).unwrap();
        assert_eq!(c.transport, Transport::Nccl);
        assert!(c.reason.contains("rank 3's GPU is not visible"), "{}", c.reason);
        // --comm ring insists; --comm nccl never probes.
        assert_eq!(pick(CommFlag::Ring, NODE8, None).unwrap().transport, Transport::P2pRing);
        let e = pick(CommFlag::Ring, NODE8, Some("no peer access"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no peer access") && e.contains("--comm nccl"), "{e}");
        let c = choose_transport(CommFlag::Nccl, NODE8, 1, &mut no_probe, false).unwrap();
        assert_eq!(c.transport, Transport::Nccl);
    }

    #[test]
    fn across_nodes_it_is_nccl_without_probing() {
        let c = choose_transport(CommFlag::Auto, TWO_NODES, 1, &mut no_probe, false).unwrap();
        assert_eq!(c.transport, Transport::Nccl);
        assert!(c.reason.contains("several nodes"), "{}", c.reason);
        let e = choose_transport(CommFlag::Ring, TWO_NODES, 1, &mut no_probe, false).unwrap_err();
        assert!(e.to_string().contains("inside one node"), "{e}");
    }

    #[test]
    fn ranks_share_gpus_only_over_the_ring() {
        assert_eq!(gpu_for_rank(CommFlag::Auto, 3, 8, 8).unwrap(), (3, None));
        assert_eq!(gpu_for_rank(CommFlag::Ring, 3, 8, 8).unwrap(), (3, None));
        let (gpu, line) = gpu_for_rank(CommFlag::Ring, 3, 4, 1).unwrap();
        assert_eq!(gpu, 0);
        assert!(line.unwrap().contains("not NVLink speed"));
        assert_eq!(gpu_for_rank(CommFlag::Ring, 5, 6, 4).unwrap().0, 1);
        for flag in [CommFlag::Auto, CommFlag::Nccl] {
            let e = gpu_for_rank(flag, 1, 2, 1).unwrap_err().to_string();
            assert!(e.contains("only 1 GPU(s) visible") && e.contains("--comm ring"), "{e}");
        }
        let e = gpu_for_rank(CommFlag::Ring, 0, 2, 0).unwrap_err().to_string();
        assert!(e.contains("no CUDA device"), "{e}");
    }

    #[test]
    fn a_failed_probe_is_an_error_not_a_choice() {
        let mut failing = || -> Result<Option<String>> { Err(NcError::new("rendezvous lost rank 2")) };
        let e = choose_transport(CommFlag::Auto, NODE8, 1, &mut failing, false).unwrap_err();
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
}
