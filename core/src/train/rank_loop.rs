//! One rank's training loop, as its phases (DESIGN.md: the loop reads as its phases). `RankRun::set_up`
//! loads the data, builds the model and the optimizer and resumes; then each pass of `train_rank`'s loop
//! evaluates and samples when due, saves when due, and takes one step: the batch and forward/backward
//! (`forward_backward`), the gradient exchange and the optimizer (`exchange_and_update`), the log line
//! (`log_step`). `RankRun` owns what the phases share.

use super::core_metric::{self, CoreMetric, CoreMetricConfig};
use super::metrics::{self, MetricsWriter};
use super::zero1::{RankCollective, Zero1};
use super::{
    estimate, evaluate, model_of, priced_precision, reshard, resolve_recompute, resume_point, sample, save_checkpoint,
    saved_dbs, signal, sync, Device, LoopState, MasterSharding, RankOptimizer, RunSummary, TrainConfig, EMA_BETA,
};
use crate::backend::Backend;
use crate::bail;
use crate::checkpoint::{self, CheckpointMeta, OptimizerMeta};
use crate::config::ModelConfig;
use crate::data::loader::LoaderState;
use crate::data::run_data::{self, RunData};
use crate::error::{NcError, Result};
use crate::model::{self, Gpt, HostMirror, MasterMap};
use crate::nvtx;
use crate::optim::clip::clip_grad_norm;
use crate::optim::schedule::{muon_momentum, LrSchedule};
use crate::optim::shard::ShardLayout;
use crate::plan::{self, BatchPlan};
use std::path::Path;
use std::time::Instant;

/// Trains one rank of `cfg` (rank 0 alone evaluates, samples, logs and writes metrics and weights) and
/// returns its summary.
pub(super) fn train_rank<B: Backend>(
    cfg: &TrainConfig,
    rank: usize,
    comm: Option<Box<dyn RankCollective<B>>>,
    device: Device<B>,
    sharding: MasterSharding,
) -> Result<RunSummary> {
    let mut run = RankRun::set_up(cfg, rank, comm, device, sharding)?;
    loop {
        let last_step = run.step == run.num_iterations;
        let stop = run.stop_requested()?;
        run.evaluate_and_sample_if_due(last_step)?;
        if last_step || stop || run.periodic_save_due() {
            run.save()?;
        }
        if last_step || stop {
            run.report_end(last_step);
            break;
        }
        run.one_step()?;
    }
    run.finish()
}

/// The log lines of a rank: printed by the lead rank of a verbose run only.
#[derive(Clone, Copy)]
struct Console {
    on: bool,
}

impl Console {
    fn say(&self, line: String) {
        if self.on {
            // A closed stdout (`nc-train | tee log` with tee gone) must not end a run: println! would panic.
            // metrics.jsonl and the checkpoints still record everything.
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }
}

/// What the phases of one rank's run share.
struct RankRun<'a, B: Backend> {
    cfg: &'a TrainConfig,
    rank: usize,
    lead: bool,
    world: usize,
    console: Console,
    data: RunData,
    model_cfg: ModelConfig,
    batch: BatchPlan,
    num_iterations: u64,
    schedule: LrSchedule,
    model: Gpt<B>,
    /// ZeRO-1 with bf16 working weights: this rank keeps the f32 master of what it owns only (`zero1`).
    shard_master: bool,
    /// Where this rank's master pieces sit in the parameter layout (all of it unless sharded).
    master_map: MasterMap,
    /// Checkpoints' host copy of the parameters, on a device backend.
    mirror: HostMirror,
    opt: RankOptimizer<B>,
    /// The gradient exchange: buckets reduced from the backward's hook (`zero1`).
    zero1: Option<Zero1<B>>,
    state: LoopState,
    step: u64,
    resume_step: Option<u64>,
    metrics: Option<MetricsWriter>,
    /// The CORE metric during training (off unless `--core-metric-every` and a bundle on every rank).
    core: CoreMetric,
    flops_per_token: f64,
    /// The peak FLOP/s of one rank, MFU's denominator.
    peak: f64,
    eval_steps: usize,
    summary: RunSummary,
}

impl<'a, B: Backend> RankRun<'a, B> {
    /// Setup: data, model, optimizer and exchange, then the resume point, the metrics file and the run's
    /// opening lines.
    fn set_up(
        cfg: &'a TrainConfig,
        rank: usize,
        comm: Option<Box<dyn RankCollective<B>>>,
        device: Device<B>,
        sharding: MasterSharding,
    ) -> Result<Self> {
        let lead = rank == 0;
        let console = Console {
            on: cfg.verbose && lead,
        };
        let world = cfg.world_size.max(1);
        let data = run_data::load(&cfg.data, rank, world, cfg.device_batch_size, cfg.model.sequence_len)?;
        let model_cfg = model_of(cfg, data.tokenizer.vocab_size())?;
        let batch = BatchPlan::new(
            cfg.device_batch_size,
            model_cfg.sequence_len,
            cfg.total_batch_size,
            cfg.world_size,
        )?;
        let num_iterations = cfg.horizon.num_iterations(&model_cfg, batch.total_batch_size);
        let schedule = LrSchedule {
            num_iterations,
            warmup_ratio: cfg.warmup_ratio,
            warmdown_ratio: cfg.warmdown_ratio,
            final_lr_frac: cfg.final_lr_frac,
        };
        let priced = priced_precision(cfg.precision, device.precision);
        let (policy, policy_why) = resolve_recompute(cfg.recompute, &model_cfg, &batch, &device, priced);
        let Device {
            be,
            peak_flops: peak,
            peak_how,
            ..
        } = device;
        let shard_master = comm.is_some()
            && sharding == MasterSharding::Owned
            && model::Storages::for_precision(cfg.precision).has_casts();
        let (dbs, seq, engine_policy) = (
            batch.device_batch_size,
            model_cfg.sequence_len,
            plan::engine_policy(policy),
        );
        let mut model = if shard_master {
            Gpt::with_sharded_master(be, model_cfg, dbs, seq, engine_policy, cfg.precision, rank, world)?
        } else {
            Gpt::with_precision(be, model_cfg, dbs, seq, engine_policy, cfg.precision)?
        };
        model.init(cfg.seed);
        let master_map = model.master_map().clone();
        let opt = RankOptimizer::new(&model, cfg.optim, rank, world)?;
        let zero1 = comm.map(|c| Zero1::new(&model_cfg, c));
        // rank 0 evaluates the whole eval_tokens alone, and never more than one pass over the validation split
        let asked_eval_steps = (cfg.eval_tokens / batch.tokens_per_fwdbwd).max(1);
        let eval_steps = asked_eval_steps.min(data.val.steps_per_epoch());
        // final_step, min_val_bpb and train_seconds are set when the run ends
        let summary = RunSummary {
            model: model_cfg,
            num_iterations,
            final_step: 0,
            stopped_early: false,
            train_losses: Vec::new(),
            evals: Vec::new(),
            samples: Vec::new(),
            min_val_bpb: f64::INFINITY,
            train_seconds: 0.0,
            peak_rss_bytes: None,
            last_checkpoint: None,
            eval_batches: eval_steps,
            eval_capped: eval_steps < asked_eval_steps,
            activation_bytes_allocated: model.allocated_activation_bytes(),
            activation_bytes_priced: {
                let (acts, loss_ws) = plan::activation_bytes(&model_cfg, batch.device_batch_size, policy, priced);
                acts + loss_ws
            },
        };
        let mut run = RankRun {
            cfg,
            rank,
            lead,
            world,
            console,
            data,
            model_cfg,
            batch,
            num_iterations,
            schedule,
            model,
            shard_master,
            master_map,
            mirror: HostMirror::default(),
            opt,
            zero1,
            state: LoopState {
                smooth_loss: 0.0,
                min_val_bpb: f64::INFINITY,
                train_seconds: 0.0,
            },
            step: 0,
            resume_step: None,
            metrics: None,
            // off until the bundle is loaded below, after the resume (as the run's lines are ordered)
            core: CoreMetric::new(&CoreMetricConfig::default(), &mut |_| {}),
            flops_per_token: model_cfg.flops_per_token(),
            peak,
            eval_steps,
            summary,
        };
        let resumed = resume_point(cfg, &model_cfg, &batch, &|line: String| console.say(line))?;
        if let Some((dir, meta)) = &resumed {
            run.restore(dir, meta)?;
        }
        run.announce_exchange();
        run.resume_step = resumed.as_ref().map(|(_, m)| m.step);
        if lead {
            std::fs::create_dir_all(&cfg.out_dir)
                .map_err(|e| NcError::new(format!("--out-dir {}: {e}", cfg.out_dir.display())))?;
            let from = resumed.as_ref().map(|(dir, m)| (m.step, dir.as_path()));
            run.metrics = Some(MetricsWriter::open(&cfg.out_dir, from)?);
        }
        // Every rank evaluates its share of CORE's examples (nanochat's striding); without a bundle on every rank
        // it is off, with one line.
        run.core = CoreMetric::new(&cfg.core_metric, &mut |l| console.say(l));
        if let Some(z) = run.zero1.as_mut() {
            run.core.agree(z.host(), &mut |l| console.say(l))?;
        }
        run.announce(policy, &policy_why, &peak_how, asked_eval_steps);
        Ok(run)
    }

    /// Loads a checkpoint's weights, this rank's optimizer state (re-sharded from another world size's
    /// ranks), the data position (re-split for another layout) and the loop state.
    fn restore(&mut self, dir: &Path, meta: &CheckpointMeta) -> Result<()> {
        let (model_cfg, rank, world) = (self.model_cfg, self.rank, self.world);
        self.model.update_params_on_host(&mut self.mirror, |params| {
            checkpoint::load_params(dir, &model_cfg, params)
        })?;
        let old_world = meta.optimizer.world_size;
        let st = if old_world == world {
            let mut st = vec![0.0f32; self.opt.state_len()];
            checkpoint::load_optim_state(dir, rank, &mut st)?;
            st
        } else {
            // the state of what this rank owns now, from the saved ranks that owned it
            reshard::reshard_state(&model_cfg, old_world, rank, world, &mut |r| {
                let mut st = vec![0.0f32; meta.optimizer.state_lens[r]];
                checkpoint::load_optim_state(dir, r, &mut st)?;
                Ok(st)
            })?
        };
        self.opt.restore(&self.model.be, &st, meta.optimizer.steps_taken)?;
        let loader: LoaderState = serde_json::from_value(meta.loader_state.clone()).map_err(|e| {
            NcError::new(format!(
                "{}: loader_state unreadable ({e}); the checkpoint is corrupt",
                dir.display()
            ))
        })?;
        // another world size or device batch: the same position, split among this run's ranks
        let tokens_per_step = world * self.batch.tokens_per_fwdbwd;
        let resplit = loader.tokens_per_step != tokens_per_step;
        self.data.train.restore(loader.for_layout(tokens_per_step))?;
        self.state = serde_json::from_value(meta.loop_state.clone()).map_err(|e| {
            NcError::new(format!(
                "{}: loop_state unreadable ({e}); the checkpoint is corrupt",
                dir.display()
            ))
        })?;
        self.step = meta.step;
        let step = self.step;
        self.console
            .say(format!("resumed from {} at step {step}", dir.display()));
        if old_world != world || resplit {
            self.console.say(format!(
                "the checkpoint was saved by {old_world} rank(s) with --dbs {}: optimizer state re-sharded for \
                 {world}, the data position re-split",
                saved_dbs(meta)
            ));
        }
        Ok(())
    }

    fn announce_exchange(&self) {
        if let Some(z) = &self.zero1 {
            self.console.say(format!(
                "zero1: {} rank(s); {} gradient buckets, each reduced into its owners as the backward finishes it",
                z.world_size(),
                z.buckets()
            ));
            if self.master_map.is_sharded() {
                self.console.say(format!(
                    "zero1: rank 0 keeps the f32 master of the {} of {} parameters it owns; the bf16 working \
                     weights are gathered",
                    self.master_map.len(),
                    self.master_map.params()
                ));
            }
        }
    }

    /// The run's opening lines: the model, the recompute policy, the batch and MFU's peak, the time estimate,
    /// and whether the evaluation is capped at one pass over the validation split.
    fn announce(&self, policy: plan::Recompute, policy_why: &str, peak_how: &str, asked_eval_steps: usize) {
        let (m, batch, say) = (&self.model_cfg, &self.batch, |line: String| self.console.say(line));
        let (peak, world) = (self.peak, self.world);
        say(format!(
            "model d{} (n_embd {}, {} heads, vocab {}, seq {}): {} params, {:.3e} FLOPs/token",
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.vocab_size,
            m.sequence_len,
            m.num_params(),
            self.flops_per_token
        ));
        say(format!(
            "recompute {} ({policy_why}): {:.1} MiB of activations per rank (precision {}, as a device stores them)",
            policy.name(),
            self.model.allocated_activation_bytes() as f64 / (1u64 << 20) as f64,
            self.cfg.precision.label()
        ));
        say(format!(
            "batch {} x {} x {} ranks, grad accum {}, {} tokens/step; {} steps; MFU against {:.1} GFLOP/s ({world} \
             rank(s) x {:.1}: {peak_how})",
            batch.device_batch_size,
            batch.seq_len,
            batch.world_size,
            batch.grad_accum,
            batch.total_batch_size,
            self.num_iterations,
            peak * world as f64 / 1e9,
            peak / 1e9
        ));
        // before the first step (and its evaluation): how long the steps will take, and a warning when minutes
        let steps_left = self.num_iterations.saturating_sub(self.step);
        for line in estimate::before_first_step(self.flops_per_token, batch, peak * world as f64, steps_left) {
            say(line);
        }
        if self.eval_steps < asked_eval_steps {
            let one_pass = self.data.val.steps_per_epoch();
            say(format!(
                "eval: --eval-tokens {} is more than the validation split holds ({} batches of {} tokens, {} \
                 tokens); each evaluation covers it once",
                self.cfg.eval_tokens,
                one_pass,
                batch.tokens_per_fwdbwd,
                one_pass * batch.tokens_per_fwdbwd
            ));
        }
    }

    /// A stop asked for by a signal or by `stop_at_step`; every rank stops at the same step (a signal reaches
    /// the ranks at different moments).
    fn stop_requested(&mut self) -> Result<bool> {
        let mut stop = signal::stop_requested() || self.cfg.stop_at_step == Some(self.step);
        if let Some(z) = self.zero1.as_mut() {
            stop = sync::any_rank(z.host(), stop)?;
        }
        Ok(stop)
    }

    /// Evaluation at step 0, every eval_every steps and at the end; the CORE metric when due (every rank, its
    /// share); samples every sample_every steps and at the end (rank 0 only).
    fn evaluate_and_sample_if_due(&mut self, last_step: bool) -> Result<()> {
        let (cfg, step) = (self.cfg, self.step);
        if self.lead && (last_step || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || step == 0) {
            let _r = nvtx::range("eval");
            let ev = evaluate(&mut self.model, &mut self.data, self.eval_steps, step)?;
            self.state.min_val_bpb = self.state.min_val_bpb.min(ev.val_bpb);
            self.console.say(format!(
                "step {step:05} | val loss {:.6} | val bpb {:.6}",
                ev.val_loss, ev.val_bpb
            ));
            if let Some(m) = self.metrics.as_mut() {
                m.write(&serde_json::json!({"step": step, "val_loss": ev.val_loss, "val_bpb": ev.val_bpb}))?;
            }
            self.summary.evals.push(ev);
        }
        if self.core.due(step, last_step) {
            let _r = nvtx::range("core metric");
            let comm = self.zero1.as_mut().map(|z| z.host() as &mut dyn nc_comm::Collective);
            let console = self.console;
            let tokenizer = &self.data.tokenizer;
            if let Some(res) = self
                .core
                .evaluate(&mut self.model, tokenizer, comm, &mut |l| console.say(l))
            {
                console.say(format!("step {step:05} | CORE metric: {:.4}", res.core_metric));
                if let Some(m) = self.metrics.as_mut() {
                    m.write(&core_metric::metrics_record(step, &res))?;
                }
            }
        }
        if self.lead && (last_step || (cfg.sample_every > 0 && step > 0 && step.is_multiple_of(cfg.sample_every))) {
            // the sampler reads the working weights: current after a step, not yet after loading a checkpoint
            self.model.refresh_weights();
            let samples = sample(
                &mut self.model,
                &self.data,
                cfg.sample_tokens,
                cfg.seed.wrapping_add(step),
            )?;
            for (p, s) in &samples {
                self.console.say(format!("sample | {p}{s}"));
            }
            self.summary.samples = samples;
        }
        Ok(())
    }

    /// Every save_every steps, except at the step a resumed run starts from (its checkpoint exists).
    fn periodic_save_due(&self) -> bool {
        let (every, step) = (self.cfg.save_every, self.step);
        every > 0 && step > 0 && step.is_multiple_of(every) && Some(step) != self.resume_step
    }

    /// A checkpoint of this step, every rank writing its part (`save_checkpoint`).
    fn save(&mut self) -> Result<()> {
        let _r = nvtx::range("checkpoint");
        let (cfg, step, world, model_cfg) = (self.cfg, self.step, self.world, self.model_cfg);
        let meta = CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            step,
            model_config: model_cfg,
            train_config: serde_json::to_value(cfg).map_err(|e| NcError::new(format!("train config: {e}")))?,
            loader_state: serde_json::to_value(self.data.train.state()).map_err(|e| NcError::new(e.to_string()))?,
            loop_state: serde_json::to_value(self.state).map_err(|e| NcError::new(e.to_string()))?,
            rng_state: serde_json::json!({"init_seed": cfg.seed, "sample_seed": cfg.seed.wrapping_add(step)}),
            optimizer: OptimizerMeta {
                steps_taken: self.opt.steps_taken(),
                world_size: world,
                state_lens: (0..world)
                    .map(|r| ShardLayout::new(&model_cfg, r, world).state_len)
                    .collect(),
            },
            // the save records every file's checksum
            files: Default::default(),
        };
        // a sharded master is gathered tensor by tensor into rank 0's host copy (the others hold one
        // tensor at a time); otherwise rank 0 reads its own
        let mut gathered: Option<Vec<f32>> = None;
        if let (true, Some(z)) = (self.master_map.is_sharded(), self.zero1.as_mut()) {
            let _r = nvtx::range("comm: gather master");
            let mut full = self.lead.then(|| vec![0.0f32; self.master_map.params()]);
            z.gather_master(
                &self.model.be,
                self.model.params_buf(),
                &self.master_map,
                full.as_deref_mut(),
            )?;
            gathered = full;
        }
        let params = match (&gathered, self.lead) {
            (Some(full), _) => Some(full.as_slice()),
            (None, true) => Some(self.model.host_params(&mut self.mirror)),
            (None, false) => None,
        };
        let saved = save_checkpoint(
            cfg,
            self.rank,
            self.zero1.as_mut().map(|z| z.host()),
            &meta,
            params,
            &self.opt.state_to_host(&self.model.be),
        )?;
        drop(gathered);
        // a device run's host copy of the parameters is as large as the model: free it between saves
        self.mirror = HostMirror::default();
        if let Some(dir) = saved {
            self.console.say(format!("saved {}", dir.display()));
            self.summary.last_checkpoint = Some(dir);
        }
        Ok(())
    }

    /// Records how the loop ended; a stopped run says how to continue it.
    fn report_end(&mut self, last_step: bool) {
        self.summary.stopped_early = !last_step;
        if self.summary.stopped_early {
            // --resume alone takes the newest checkpoint of the out dir that verifies: the one just saved
            let saved = self.summary.last_checkpoint.as_ref().map(|p| p.display().to_string());
            self.console.say(format!(
                "stopped at step {} of {}; saved {}; continue with the same flags plus --resume",
                self.step,
                self.num_iterations,
                saved.unwrap_or_else(|| "nothing".into())
            ));
        }
    }

    /// One optimizer step: batch and forward/backward, gradient exchange and optimizer, the log line.
    fn one_step(&mut self) -> Result<()> {
        if self.cfg.profile_steps.is_some_and(|(first, _)| first == self.step) {
            self.model.be.profiler_capture(true)?;
        }
        let step_range = nvtx::range("step");
        let t0 = Instant::now();
        let loss = self.forward_backward()?;
        let lr_mult = self.schedule.lr_multiplier(self.step);
        let optimizer_range = nvtx::range("optimizer");
        let grad_norm = self.exchange_and_update(lr_mult)?;
        // the bf16 working copy of the weights follows the master (nothing to do in fp32)
        self.model.refresh_weights();
        drop(optimizer_range);
        drop(step_range);
        let dt = t0.elapsed().as_secs_f64();
        self.log_step(loss, grad_norm, lr_mult, dt)?;
        if self.cfg.profile_steps.is_some_and(|(_, last)| last == self.step) {
            self.model.be.synchronize();
            self.model.be.profiler_capture(false)?;
        }
        self.step += 1;
        Ok(())
    }

    /// The step's micro-batches through forward and backward, grads accumulated; returns the step's mean
    /// loss over every micro-batch of every rank.
    fn forward_backward(&mut self) -> Result<f32> {
        let (grad_accum, world) = (self.batch.grad_accum, self.world);
        self.model.zero_grads();
        let mut loss_sum = 0.0f64;
        // the step's gradient is the mean over every micro-batch of every rank (the ranks' grads are summed)
        let loss_scale = 1.0 / (grad_accum * world) as f32;
        for micro in 0..grad_accum {
            let _r = nvtx::range("micro-step");
            let b = self.data.train.next_batch();
            let loss = match self.zero1.as_mut() {
                // the last micro-batch's backward reduces each bucket as it finishes it (the earlier ones
                // only accumulate)
                Some(z) if micro + 1 == grad_accum => {
                    z.begin_reduce();
                    let mut hook = |be: &B, g: &mut B::Buf, ready| z.grads_ready(be, g, ready);
                    self.model
                        .forward_backward_hooked(&b.inputs, &b.targets, loss_scale, &mut hook)?
                }
                _ => self.model.forward_backward(&b.inputs, &b.targets, loss_scale)?,
            };
            loss_sum += loss as f64;
        }
        let mut loss = (loss_sum / grad_accum as f64) as f32;
        if let Some(z) = self.zero1.as_mut() {
            let _r = nvtx::range("comm: mean loss");
            loss = sync::mean_over_ranks(z.host(), loss)?;
        }
        if !loss.is_finite() {
            bail!(
                "the train loss became {loss} at step {}; lower the learning rates (e.g. --matrix-lr 0.01)",
                self.step
            );
        }
        Ok(loss)
    }

    /// The gradient exchange (with several ranks), clipping and the optimizer; returns the gradient norm
    /// before clipping.
    fn exchange_and_update(&mut self, lr_mult: f64) -> Result<f64> {
        let (grad_clip, momentum) = (self.cfg.grad_clip, muon_momentum(self.step));
        let grad_norm = match (&mut self.opt, self.zero1.as_mut()) {
            (opt, Some(z)) => {
                // ZeRO-1: the owned parts of the summed gradient, clipped; this rank's update; the gather (of
                // the bf16 working copy when the master is sharded, else of the f32 master)
                let (be, params, grads, working) = self.model.backend_params_grads_working_mut();
                let reduce_range = nvtx::range("comm: reduce grads");
                let grad_norm = z.finish_reduce_and_clip(be, grads, grad_clip)?;
                drop(reduce_range);
                let mut working = if self.shard_master { working } else { None };
                match opt {
                    // bf16 runs (the only ones with a sharded master) step with the device optimizer
                    RankOptimizer::Host(_) if working.is_some() => {
                        bail!("a sharded master is stepped by the device optimizer (a bf16 run), not the host one")
                    }
                    RankOptimizer::Host(opt) => {
                        let (p, g) = match (B::host_slice_mut(params), B::host_slice(grads)) {
                            (Some(p), Some(g)) => (p, g),
                            _ => bail!("the host optimizer needs host buffers"),
                        };
                        opt.step(p, g, lr_mult, momentum);
                    }
                    RankOptimizer::Device(opt) => {
                        let w = working.as_deref_mut();
                        opt.step_writing(be, params, grads, w, lr_mult, momentum)
                    }
                }
                let gather_range = nvtx::range("comm: gather weights");
                // the optimizer wrote the owned pieces of the working copy; the owners send the others
                match working {
                    Some(working) => z.gather_params(be, working)?,
                    None => z.gather_params(be, params)?,
                }
                drop(gather_range);
                // queued work on a device: wait for it, so dt is this step's own time (nothing on the CPU)
                be.synchronize();
                if self.shard_master {
                    // owned pieces written, the rest gathered: refresh_weights has nothing to cast
                    self.model.working_written();
                }
                grad_norm
            }
            (RankOptimizer::Host(opt), None) => {
                let (params, grads) = self
                    .model
                    .host_params_and_grads_mut()
                    .expect("the host optimizer is chosen only for host buffers");
                let grad_norm = clip_grad_norm(grads, grad_clip);
                opt.step(params, grads, lr_mult, momentum);
                grad_norm
            }
            (RankOptimizer::Device(opt), None) => {
                // a single rank: its gradient is the synchronized one
                let (be, params, grads, working) = self.model.backend_params_grads_working_mut();
                let wrote_working = working.is_some() && opt.owns_everything();
                let grad_norm = opt.clip(be, grads, grad_clip);
                opt.step_writing(be, params, grads, working, lr_mult, momentum);
                // the step is queued work: wait for it, so dt (and tok/s, MFU) is this step's own time
                be.synchronize();
                if wrote_working {
                    // the update kernels wrote the bf16 copy: refresh_weights has nothing to cast
                    self.model.working_written();
                }
                grad_norm
            }
        };
        Ok(grad_norm)
    }

    /// The step's line, its metrics record, the loss EMA and the training time.
    fn log_step(&mut self, loss: f32, grad_norm: f64, lr_mult: f64, dt: f64) -> Result<()> {
        let (step, num_iterations, tokens) = (self.step, self.num_iterations, self.batch.total_batch_size);
        let first_step_here = self.resume_step.unwrap_or(0) == step;
        // the first steps pay for warm-up; nanochat leaves the first 10 out of its total time
        if step > 10 || num_iterations <= 20 {
            self.state.train_seconds += dt;
        }
        self.state.smooth_loss = EMA_BETA * self.state.smooth_loss + (1.0 - EMA_BETA) * loss as f64;
        let debiased = self.state.smooth_loss / (1.0 - EMA_BETA.powi(step as i32 + 1));
        let tok_per_sec = tokens as f64 / dt;
        // nanochat's MFU: the step's tokens are those of all ranks, so the peak is that of all ranks
        let mfu = metrics::mfu(self.flops_per_token, tokens, dt, self.peak, self.world);
        self.console.say(format!(
            "step {:05}/{:05} ({:5.2}%) | loss: {debiased:.6} | grad norm: {grad_norm:.4} | lrm: {lr_mult:.2} | dt: {:.2}ms | tok/sec: {:.0} | mfu: {:.2} | total time: {:.2}m",
            step,
            num_iterations,
            100.0 * step as f64 / num_iterations as f64,
            dt * 1e3,
            tok_per_sec,
            100.0 * mfu,
            self.state.train_seconds / 60.0
        ));
        if let Some(m) = self.metrics.as_mut() {
            m.write(&serde_json::json!({
                "step": step, "loss": debiased, "raw_loss": loss, "grad_norm": grad_norm, "lr_mult": lr_mult,
                "dt_ms": dt * 1e3, "tok_per_sec": tok_per_sec, "mfu": mfu,
            }))?;
        }
        if first_step_here && step + 1 < num_iterations {
            self.console
                .say(estimate::after_first_step(dt, num_iterations.saturating_sub(step + 1)));
        }
        self.summary.train_losses.push((step, loss));
        Ok(())
    }

    /// The summary of the run, with its closing lines (peak memory, training time, the device's memory).
    fn finish(mut self) -> Result<RunSummary> {
        let state = self.state;
        self.summary.final_step = self.step;
        self.summary.min_val_bpb = state.min_val_bpb;
        self.summary.train_seconds = state.train_seconds;
        self.summary.peak_rss_bytes = metrics::peak_rss_bytes();
        self.console.say(format!(
            "done: peak memory {:.1} MiB | total training time {:.2}m | min val bpb {:.6}",
            self.summary.peak_rss_bytes.unwrap_or(0) as f64 / 1048576.0,
            state.train_seconds / 60.0,
            state.min_val_bpb
        ));
        if let Some(r) = self.model.be.memory_report() {
            self.console.say(r.summary.clone());
            if let Some(m) = self.metrics.as_mut() {
                m.write(&serde_json::json!({
                    "device": r.device, "peak_reserved_bytes": r.peak_reserved_bytes,
                    "peak_allocated_bytes": r.peak_allocated_bytes,
                }))?;
            }
        }
        Ok(self.summary)
    }
}
