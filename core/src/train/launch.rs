//! One process per rank: how a worker learns who it is (the variables torchrun, srun wrappers and
//! `nc-train`'s own supervisor set), what the ranks must agree on before they start (the fingerprint), and
//! how they join (the TCP rendezvous, then the shared-memory ring on one machine).

use crate::bail;
use crate::checkpoint;
use crate::data::run_data::DataSource;
use crate::error::{NcError, Result};
use crate::train::{Resume, TrainConfig};
pub use nc_comm::Collective;
use nc_comm::{Bounds, CommError, Member, Rendezvous, RendezvousConfig, ShmRing};
use std::path::Path;
use std::time::Duration;

/// The variables of the torchrun convention, in the order they are read.
pub const LAUNCH_VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// Seconds every rank waits for all ranks to arrive at the rendezvous (NC_RENDEZVOUS_TIMEOUT overrides).
const RENDEZVOUS_TIMEOUT_S: u64 = 300;
/// Seconds a collective waits on a live peer before failing (NC_COLLECTIVE_TIMEOUT overrides). Rank 0
/// evaluates and saves while the others wait in the next collective, so this is long; a peer whose process
/// is gone is noticed at once, not after it.
const COLLECTIVE_TIMEOUT_S: u64 = 1800;

/// Who this process is in a run of several processes, as the launcher said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this machine: the GPU it uses.
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn parse_var<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| NcError::new(format!("{name}={value:?} is not a valid number")))
}

impl WorkerEnv {
    /// From this process's environment: None when neither RANK nor WORLD_SIZE is set (not started by a
    /// launcher).
    pub fn from_env() -> Result<Option<WorkerEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From any source of variables (tests pass a map). RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are
    /// required once one of RANK and WORLD_SIZE is set; LOCAL_RANK and LOCAL_WORLD_SIZE default to a single
    /// machine (RANK and WORLD_SIZE), as a plain `srun` wrapper may not set them.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<WorkerEnv>> {
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let need = |name: &str| {
            get(name).ok_or_else(|| {
                NcError::new(format!(
                    "{name} is not set, but RANK or WORLD_SIZE is: a launcher must set all of RANK, WORLD_SIZE, \
                     MASTER_ADDR and MASTER_PORT (torchrun does); unset RANK and WORLD_SIZE to let nc-train start \
                     its own ranks"
                ))
            })
        };
        let rank: usize = parse_var("RANK", &need("RANK")?)?;
        let world_size: usize = parse_var("WORLD_SIZE", &need("WORLD_SIZE")?)?;
        let master_addr = need("MASTER_ADDR")?;
        let master_port: u16 = parse_var("MASTER_PORT", &need("MASTER_PORT")?)?;
        let local_rank: usize = match get("LOCAL_RANK") {
            Some(v) => parse_var("LOCAL_RANK", &v)?,
            None => rank,
        };
        let local_world_size: usize = match get("LOCAL_WORLD_SIZE") {
            Some(v) => parse_var("LOCAL_WORLD_SIZE", &v)?,
            None => world_size,
        };
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} must be below WORLD_SIZE={world_size}");
        }
        if local_world_size == 0 || local_rank >= local_world_size || local_world_size > world_size {
            bail!(
                "LOCAL_RANK={local_rank} must be below LOCAL_WORLD_SIZE={local_world_size}, which must not exceed \
                 WORLD_SIZE={world_size}"
            );
        }
        if master_addr.trim().is_empty() {
            bail!("MASTER_ADDR is empty; set it to rank 0's host name or address");
        }
        Ok(Some(WorkerEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }
}

/// A duration in seconds from an environment variable, or the default.
fn seconds_from_env(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(v) => {
            let s: f64 = v
                .trim()
                .parse()
                .map_err(|_| NcError::new(format!("{name}={v:?} is not a number of seconds")))?;
            if !(s.is_finite() && s > 0.0) {
                bail!("{name}={v:?} must be a positive number of seconds");
            }
            Ok(Duration::from_secs_f64(s))
        }
        Err(_) => Ok(Duration::from_secs(default)),
    }
}

/// FNV-1a, 64 bits: a hash that is the same in every build, for the data's identity across machines.
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The names and sizes of the files of a folder, sorted, hashed; and how many there are.
fn folder_identity(dir: &Path) -> (usize, u64) {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), size)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut h = 0xcbf2_9ce4_8422_2325;
    for (name, size) in &files {
        h = fnv1a(name.as_bytes(), h);
        h = fnv1a(&size.to_le_bytes(), h);
    }
    (files.len(), h)
}

/// What the data is, independent of where it is mounted: the embedded corpus's parameters, or the names and
/// sizes of the tokenizer's files and of the token shards.
fn data_identity(source: &DataSource) -> String {
    match source {
        DataSource::Embedded { .. } => format!("{source:?}"),
        DataSource::Dir(dir) => {
            let (nt, ht) = folder_identity(&dir.join("tokenizer"));
            let (ns, hs) = folder_identity(&dir.join("shards"));
            format!("tokenizer: {nt} files, hash {ht:016x}; shards: {ns} files, hash {hs:016x}")
        }
    }
}

/// The flag a TrainConfig field comes from, for messages.
fn flag_of(key: &str) -> String {
    match key {
        "model" => "--depth/--preset/--n-kv-head/--max-seq-len (the model's shape)".into(),
        "horizon" => "--num-iterations/--target-flops/--target-param-data-ratio".into(),
        "optim" => "--matrix-lr/--embedding-lr/--unembedding-lr/--weight-decay".into(),
        "data" => "--data-dir".into(),
        "device_batch_size" => "--device-batch-size".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

/// What every rank must agree on before training together: every setting of the run (as (flag, value)),
/// the backend, the data's identity, the checkpoint a resume starts from, and the program's version.
pub fn fingerprint(cfg: &TrainConfig, backend: &str) -> Result<Vec<(String, String)>> {
    let value = serde_json::to_value(cfg).map_err(|e| NcError::new(format!("train config: {e}")))?;
    let mut pairs = vec![("nc-train version".to_string(), env!("CARGO_PKG_VERSION").to_string())];
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            // logging differs by rank, nothing else may
            if k != "verbose" {
                pairs.push((flag_of(&k), v.to_string()));
            }
        }
    }
    pairs.push(("--backend".into(), backend.into()));
    pairs.push(("--data-dir (its contents)".into(), data_identity(&cfg.data)));
    let resume_from = match &cfg.resume {
        Resume::No => "none".to_string(),
        Resume::Latest => match checkpoint::latest(&cfg.out_dir)? {
            Some(d) => d.display().to_string(),
            None => "none found".into(),
        },
        Resume::Path(p) => p.display().to_string(),
    };
    pairs.push(("--resume (the checkpoint)".into(), resume_from));
    Ok(pairs)
}

/// The collective of a rank of several processes on one machine: the shared-memory ring, with the
/// rendezvous kept open beside it (rank 0's connections to every rank are how a dead process is noticed,
/// and closing them says goodbye).
pub struct ProcessRing {
    ring: ShmRing,
    _rendezvous: Rendezvous,
}

impl Collective for ProcessRing {
    fn member(&self) -> Member {
        self.ring.member()
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> std::result::Result<(), CommError> {
        self.ring.reduce_scatter_sum(buf, bounds)
    }
    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> std::result::Result<(), CommError> {
        self.ring.all_gather(buf, bounds)
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::result::Result<(), CommError> {
        self.ring.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum_bf16(
        &mut self,
        buf: &mut [nc_comm::bf16],
        bounds: &Bounds,
    ) -> std::result::Result<(), CommError> {
        self.ring.reduce_scatter_sum_bf16(buf, bounds)
    }
    fn all_gather_bf16(&mut self, buf: &mut [nc_comm::bf16], bounds: &Bounds) -> std::result::Result<(), CommError> {
        self.ring.all_gather_bf16(buf, bounds)
    }
    fn all_reduce_sum_bf16(&mut self, buf: &mut [nc_comm::bf16]) -> std::result::Result<(), CommError> {
        self.ring.all_reduce_sum_bf16(buf)
    }
    fn barrier(&mut self) -> std::result::Result<(), CommError> {
        self.ring.barrier()
    }
}

/// A transport's error, saying which rank saw it: this one (the transports' own errors mostly say so already).
fn comm_error(env: &WorkerEnv, e: CommError) -> NcError {
    NcError::from(e).with_rank(env.rank)
}

/// Meet the other ranks at MASTER_ADDR:MASTER_PORT and check that they run the same job. Every rank calls
/// it, also at world size 1 (where it returns at once), so a single rank goes through the same launch code.
pub fn rendezvous(env: &WorkerEnv, fingerprint: &[(String, String)]) -> Result<Rendezvous> {
    let cfg = RendezvousConfig {
        rank: env.rank,
        world_size: env.world_size,
        master_addr: env.master_addr.clone(),
        master_port: env.master_port,
        timeout: seconds_from_env("NC_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT_S)?,
    };
    Rendezvous::join(&cfg, fingerprint).map_err(|e| comm_error(env, e))
}

/// The CPU ranks' collective: after the rendezvous, rank 0 names the run's shared-memory segment and every
/// rank joins the ring over it. All ranks must be on this machine.
pub fn join_cpu_ring(env: &WorkerEnv, mut rdv: Rendezvous) -> Result<ProcessRing> {
    if env.local_world_size != env.world_size {
        return Err(NcError::at_rank(
            env.rank,
            format!(
                "--backend cpu runs its ranks on one machine (a shared-memory ring), but WORLD_SIZE={} and \
                 LOCAL_WORLD_SIZE={}; start all ranks on one machine",
                env.world_size, env.local_world_size
            ),
        ));
    }
    let timeout = seconds_from_env("NC_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_S)?;
    // unique per run: rank 0's process id and the rendezvous port
    let mine = format!("run{}-{}", std::process::id(), env.master_port);
    let name = rdv.broadcast_bytes(mine.as_bytes()).map_err(|e| comm_error(env, e))?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let ring = ShmRing::join(&mut rdv, &name, timeout).map_err(|e| comm_error(env, e))?;
    Ok(ProcessRing { ring, _rendezvous: rdv })
}

/// One process per GPU: `ranks` on this machine need as many visible GPUs (NCCL refuses two ranks on one
/// GPU, with an error that does not say so). Checked before any rank touches NCCL.
pub fn check_gpus_for_ranks(ranks: usize, visible_gpus: usize) -> Result<()> {
    if visible_gpus == 0 {
        bail!(
            "--backend cuda: no CUDA device is visible (driver missing, or CUDA_VISIBLE_DEVICES empty); check \
             nvidia-smi, or use --backend cpu"
        );
    }
    if ranks > visible_gpus {
        bail!(
            "{ranks} ranks on this machine but only {visible_gpus} GPU(s) visible: each rank needs its own GPU \
             (NCCL cannot put two ranks of one communicator on one GPU); start at most {visible_gpus} per machine \
             (--nproc-per-node {visible_gpus}, or torchrun's), or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        );
    }
    Ok(())
}

/// The CUDA ranks' collective: NCCL on a communication stream of the rank's backend (GPU `LOCAL_RANK`; a
/// stream of its own, in the same context), the unique id through the rendezvous. More than one rank
/// without libnccl is an error on every rank naming the rank that lacks it and how to provide it
/// (`nc_comm::nccl::MISSING_NCCL`). At world size 1 it still creates a one-rank communicator when NCCL is
/// found (so a one-GPU machine checks launch, rendezvous and NCCL init), and is the identity without it.
/// A collective that has not completed after NC_COLLECTIVE_TIMEOUT seconds ends the run (the ring's watchdog).
/// Run on the simulated GPU's NCCL stand-in (bin/tests/sim_multi_nccl.rs); not yet on a GPU.
pub fn join_nccl(
    env: &WorkerEnv,
    rdv: &mut Rendezvous,
    be: &crate::backend::cuda::CudaBackend,
) -> Result<nc_comm::NcclRing> {
    let stream = crate::train::zero1_nccl::NcclExchange::comm_stream(be).map_err(|e| e.with_rank(env.rank))?;
    crate::nvtx::name_cuda_stream(stream.cu_stream() as *mut std::ffi::c_void, "nc nccl");
    // the watchdog ends the run when a collective has not completed in this time (a stuck peer)
    let timeout = seconds_from_env("NC_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_S)?;
    nc_comm::NcclRing::join_with_timeout(rdv, stream, timeout).map_err(|e| comm_error(env, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Option<WorkerEnv>> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorkerEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn the_torchrun_variables_make_a_worker() {
        assert_eq!(env_of(&[]).unwrap(), None);
        let full = [
            ("RANK", "9"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ];
        let w = env_of(&full).unwrap().unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.local_world_size, w.master_port),
            (9, 16, 1, 8, 29500)
        );
        // LOCAL_* default to one machine
        let w = env_of(&full[..2].iter().chain(&full[4..]).copied().collect::<Vec<_>>())
            .unwrap()
            .unwrap();
        assert_eq!((w.local_rank, w.local_world_size), (9, 16));
    }

    #[test]
    fn bad_launch_variables_are_errors_naming_them() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("RANK", "0")], "WORLD_SIZE is not set"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "MASTER_PORT is not set",
            ),
            (
                &[
                    ("RANK", "x"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "RANK=\"x\"",
            ),
            (
                &[
                    ("RANK", "2"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "below WORLD_SIZE",
            ),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "MASTER_PORT",
            ),
        ];
        for (vars, needle) in cases {
            let e = env_of(vars).unwrap_err();
            assert!(e.message.contains(needle), "{vars:?}: {e}");
        }
    }

    #[test]
    fn more_ranks_than_gpus_is_refused_before_nccl() {
        assert!(check_gpus_for_ranks(8, 8).is_ok());
        assert!(check_gpus_for_ranks(1, 8).is_ok());
        let e = check_gpus_for_ranks(2, 1).unwrap_err();
        assert!(e.message.contains("2 ranks on this machine but only 1 GPU"), "{e}");
        assert!(e.message.contains("--nproc-per-node 1"), "{e}");
        let e = check_gpus_for_ranks(1, 0).unwrap_err();
        assert!(e.message.contains("no CUDA device"), "{e}");
    }

    #[test]
    fn the_data_identity_ignores_where_the_data_is() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("shards")).unwrap();
            std::fs::create_dir_all(d.join("tokenizer")).unwrap();
            std::fs::write(d.join("shards/train_000000.bin"), [0u8; 100]).unwrap();
        }
        let id = |d: &Path| data_identity(&DataSource::Dir(d.to_path_buf()));
        assert_eq!(id(a.path()), id(b.path()));
        std::fs::write(b.path().join("shards/train_000000.bin"), [0u8; 101]).unwrap();
        assert_ne!(id(a.path()), id(b.path()), "a shard of another size is other data");
    }
}
