"""The training loop shared by `train_network` (LoRA) and `train` (full finetune), on accelerate.

Runs the same under `python -m engine ...` (one process) and `accelerate launch --multi_gpu --num_processes N -m
engine ...` (docs/multi-gpu.md; `--cpu --num_processes N` starts ONE process). Multi-process: each process takes
every N-th batch of the epoch's (seeded) order, and the
trained weights' gradients are averaged across processes before each optimizer step (an all-reduce per tensor;
with --fused_backward_pass inside the per-parameter hook, before the update), which is what DDP computes. We do
not wrap the model in DDP because the trained module is not what is called (LoRA wraps the DiT's Linears) and
DDP cannot hold block-swapped weights. Only the main process writes model files, samples and logs; all take part
in state saves (each keeps its own RNG state).

Reproducibility: noise and timesteps of a batch come from a generator seeded with (seed, the batch's place in the
run's order of batches), whichever process runs it, and the batch order of an epoch from (seed + epoch). So
--resume continues with the identical loss curve, and N processes × batch B equal one process with
--gradient_accumulation_steps N on the same batches (tests/test_train_ddp.py). The logged loss of a step is the mean
over its micro-batches and processes: the loss of the global batch whose gradient the step applies.

API: `run_training(cfg, events, full) -> [output paths]`
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from engine.models.dit import check_dit_headers
from engine.models.runtime import resolve_device
from engine.spec.errors import NumericError, OptionError
from engine.spec.run_outputs import existing_outputs
from engine.spec.variants import get_variant
from engine.train import ema as E
from engine.train import fsdp, samples
from engine.train import checkpoints as ckpt
from engine.train import validation as V
from engine.train import validation_images as VI
from engine.train.items import ItemCache, drop_captions
from engine.train.optim import create_optimizer, create_scheduler, enable_fused_backward
from engine.train.report import emit_estimate, report_memory, write_run_config
from engine.train.step import flow_loss, predict, prepare_inputs
from engine.train.timesteps import TimestepSampler
from engine.train.trainee import dit_dtype, full_trainee, lora_trainee
from engine.train.validate import check_batches, check_config, open_dataset

log = logging.getLogger(__name__)
MAX_NAN_RUN = 10           # --skip_nan_steps: this many failed steps in a row stop the run (the model is broken)


@dataclass
class Schedule:
    micro_per_epoch: int        # batches each process runs per epoch
    steps_per_epoch: int        # optimizer steps per epoch
    total_steps: int
    epochs: int


def make_schedule(cfg, num_batches: int, world: int) -> Schedule:
    micro = math.ceil(num_batches / world)
    per_epoch = math.ceil(micro / cfg.gradient_accumulation_steps)
    total = cfg.max_train_epochs * per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    return Schedule(micro, per_epoch, total, math.ceil(total / per_epoch))


def step_generator(seed: int, batch_index: int) -> torch.Generator:
    """`batch_index`: the batch's place in the run (epoch × padded batches per epoch + place in the epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index * 1009) % (2 ** 63))


def run_training(cfg, events, full: bool) -> list[str]:
    variant = get_variant(cfg.resolved_version())
    if cfg.seed is None:
        log.info("no --seed given: using 42 (recorded in the run config), so the run can be repeated")
    cfg = replace(cfg, output_name=cfg.output_name or ("qwen_image_finetune" if full else "qwen_image_lora"),
                  seed=cfg.seed if cfg.seed is not None else 42)
    check_config(cfg, full)
    if fsdp.enabled():
        fsdp.check(cfg, full)
    check_dit_headers(cfg.dit, variant)
    if cfg.sample_prompts:
        samples.check_prompts(cfg, variant)
    data = open_dataset(cfg, variant.name)
    check_batches(cfg, data)
    validation = V.Validation.open(cfg, variant.name)     # its caches are checked before the model loads too
    accelerator = make_accelerator(cfg)
    if cfg.resume:
        ckpt.check_same_world(cfg.resume, accelerator.num_processes)     # before the model is loaded
    run = Run(cfg, events, accelerator, variant, data, full)
    run.validation = validation if run.main else None
    return run.train()


def make_accelerator(cfg):
    logging.getLogger("accelerate").setLevel(logging.WARNING)     # its per-file save/load lines flood the job log

    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise OptionError("--mixed_precision fp16 needs a CUDA device.", "Use bf16 or no on the CPU.")

    # A second run in the same process (tests, notebooks) may use another precision: accelerate keeps it in a
    # singleton. The process-level state (distributed setup) is kept.
    AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=cfg.logging_dir, logging_dir=cfg.logging_dir)
    # Several processes: the main one alone samples and writes checkpoints (minutes for the 20B DiT) while the others
    # wait in a barrier or the next all-reduce; torch's default NCCL timeout (10 min) would abort the run there.
    # A crashed process still stops the job at once (torchrun ends the others).
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(hours=3))
    return Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision, project_config=project,
                       log_with=_trackers(cfg.log_with), kwargs_handlers=[timeout])


def _trackers(log_with):
    return {None: None, "tensorboard": "tensorboard", "wandb": "wandb", "all": ["tensorboard", "wandb"]}[log_with]


class Run:
    def __init__(self, cfg, events, accelerator, variant, data, full: bool):
        self.cfg, self.events, self.acc, self.variant, self.data, self.full = cfg, events, accelerator, variant, data, full
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.fsdp = full and fsdp.enabled()       # weights, gradients, states sharded (engine/train/fsdp.py)
        self.schedule = make_schedule(cfg, data.num_batches, self.world)
        self.outputs: list[str] = []
        self.losses: list[float] = []
        self.nan_steps, self.nan_run = 0, 0        # skipped steps (--skip_nan_steps): all, and in a row
        self.items = ItemCache(data)
        self.validation = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if self.main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            for path in ckpt.remove_dead_temps(cfg.output_dir, cfg.output_name) + \
                    ckpt.remove_state_leftovers(cfg.output_dir, cfg.output_name):
                log.info("removed %s, left by a save that was interrupted", path.name)
            if cfg.overwrite and not cfg.resume:
                for path in existing_outputs(cfg.output_dir, cfg.output_name):
                    log.warning("--overwrite: %s of an earlier run with this name will be replaced", path.name)
            self.outputs.append(str(write_run_config(cfg, "train" if self.full else "train_network")))
            emit_estimate(cfg, self.data, self.events, self.full)
        self.sampler = TimestepSampler.from_config(cfg)
        if cfg.sample_prompts:
            self.events.phase("loading", model="text encoder")
        self.prompts = samples.SamplePrompts.prepare(cfg, self.variant, self.device,
                                                     dit_dtype(cfg, self.device, self.full),
                                                     cfg.output_name) if self.main else None
        self.val_images = VI.ValidationImages.prepare(cfg, self.variant, self.device, dit_dtype(
            cfg, self.device, self.full)) if self.main else None
        self.events.phase("loading", model="dit")
        torch.manual_seed(cfg.seed)                       # LoRA init: the same on every process
        if self.fsdp:
            self.t = fsdp.trainee(cfg, self.variant, self.device, self.world)
        else:
            self.t = (full_trainee if self.full else lora_trainee)(cfg, self.variant, self.device)
        self.params = [p for g in self.t.param_groups for p in g["params"]]
        self._broadcast_weights()
        self.ema = E.Ema.create(E.trained_tensors(self.t.module, self.params), cfg, self.device) if self.main else None
        self.optimizer, self.optimizer_text = create_optimizer(self.t.param_groups, cfg.optimizer_type,
                                                               cfg.learning_rate, cfg.optimizer_args)
        scheduler_name = cfg.lr_scheduler
        if self.optimizer.defaults.get("relative_step") and scheduler_name != "adafactor":
            log.info("Adafactor with relative_step sets its own lr: --lr_scheduler %s is replaced by 'adafactor' "
                     "(as musubi); pass relative_step=False in --optimizer_args to use it", scheduler_name)
            scheduler_name = "adafactor"
        self.scheduler = create_scheduler(self.optimizer, scheduler_name, self.schedule.total_steps,
                                          cfg.lr_warmup_steps, cfg.lr_decay_steps, cfg.lr_scheduler_num_cycles,
                                          cfg.lr_scheduler_power, cfg.lr_scheduler_min_lr_ratio)
        self.fused = self.full and cfg.fused_backward_pass
        if self.fused:
            if self.world > 1:
                for p in self.params:
                    p.register_post_accumulate_grad_hook(self._reduce_grad)
            enable_fused_backward(self.optimizer, cfg.max_grad_norm)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        if self.fsdp:        # model and optimizer shards go through torch.distributed.checkpoint instead
            self.acc.register_for_checkpointing(self.scheduler)
        else:
            self.acc.register_for_checkpointing(self.t.module, self.optimizer, self.scheduler)
        if cfg.log_with and self.main:
            self.acc.init_trackers(f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")

    def _broadcast_weights(self) -> None:
        if self.world > 1 and not self.fsdp:          # FSDP shards of one file read by every process
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def _reduce_grad(self, param) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG if param.grad.device.type == "cuda" else dist.ReduceOp.SUM)
        if param.grad.device.type != "cuda":           # gloo has no AVG
            param.grad.div_(self.world)

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> list[str]:
        cfg, sch = self.cfg, self.schedule
        self.setup()
        self.step, start_epoch, start_micro = 0, 0, 0
        if cfg.resume:
            progress = ckpt.load_state(self.acc, cfg.resume)
            if self.fsdp:
                fsdp.load_shards(cfg.resume, self.t.module, self.optimizer)
            self.step, start_epoch, start_micro = progress["step"], progress["epoch"], progress["micro"]
            self.losses = progress.get("losses", [])
            E.resume(self.ema, cfg.resume)
            if progress.get("batches_per_epoch", self.data.num_batches) != self.data.num_batches:
                log.warning("--resume: the dataset now has %d batches per epoch, the state was saved with %d; "
                            "training continues from the same step, but not with the same data order",
                            self.data.num_batches, progress["batches_per_epoch"])
            log.info("resumed from %s at step %d (epoch %d, batch %d)", cfg.resume, self.step, start_epoch + 1,
                     start_micro)
        log.info("training: %d steps, %d epoch(s) of %d step(s), %d process(es), %d batches per epoch",
                 sch.total_steps, sch.epochs, sch.steps_per_epoch, self.world, self.data.num_batches)
        if cfg.sample_at_first and self.step == 0:
            self._sample(0, None)
        if self.step == 0:
            self._validate()
        self.events.phase("training", total=sch.total_steps)
        self.started, self.start_step = time.time(), self.step
        try:
            for epoch in range(start_epoch, sch.epochs):
                if self._run_epoch(epoch, start_micro if epoch == start_epoch else 0):
                    break
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        self._finish()
        return self.outputs

    def _run_epoch(self, epoch: int, first_micro: int) -> bool:
        """One epoch from batch `first_micro`; True when the step budget is used up."""
        cfg, sch = self.cfg, self.schedule
        batches = self.data.epoch_batches(epoch, cfg.seed)
        mine = [batches[(j * self.world + self.rank) % len(batches)] for j in range(sch.micro_per_epoch)]
        pending, loss_sum = 0, 0.0
        self.epoch = epoch
        for i in range(first_micro, sch.micro_per_epoch):
            batch_index = (epoch * sch.micro_per_epoch + i) * self.world + self.rank   # its place in the epoch (padded)
            loss_sum = loss_sum + self._forward_backward(mine[i], batch_index)
            pending += 1
            if pending < cfg.gradient_accumulation_steps and i + 1 < sch.micro_per_epoch:
                continue
            loss = self._mean_loss(loss_sum / pending)   # the same on every process, so all take the same branch
            if math.isfinite(loss) and self._optimizer_step():
                self.nan_run = 0
            else:
                self._skip_nan_step(loss)
            self.step += 1
            self.micro_next = (epoch, i + 1)
            self._after_step(loss)
            pending, loss_sum = 0, 0.0
            if self.step >= sch.total_steps:
                if i + 1 == sch.micro_per_epoch:       # the budget ends with the epoch: its end still counts
                    self._after_epoch(epoch + 1)
                return True
        self._after_epoch(epoch + 1)
        return False

    def _forward_backward(self, batch, batch_index: int) -> torch.Tensor:
        gen = step_generator(self.cfg.seed, batch_index)
        tensors = drop_captions(self.items.load(batch), batch, self.data, self.cfg.seed, batch_index)
        inputs = prepare_inputs(tensors, self.sampler, gen, self.device, self.t.dtype)
        with self.acc.autocast() if self.cfg.mixed_precision != "no" else contextlib.nullcontext():
            pred = predict(self.t.dit, inputs, self.cfg.split_attn)
        loss = flow_loss(pred, inputs)
        scaled = loss / self.cfg.gradient_accumulation_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def _optimizer_step(self) -> bool:
        """Apply the accumulated gradients; False (nothing applied) when their norm is NaN/inf."""
        if self.fused:                       # already stepped parameter by parameter during backward
            self.scheduler.step()
            return True
        if self.world > 1 and not self.fsdp:          # FSDP reduce-scatters (averages) in the backward
            for p in self.params:
                if p.grad is not None:
                    self._reduce_grad(p)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            if not self.scaler and not bool(torch.isfinite(norm)):   # fp16's scaler skips such steps itself
                return False
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _skip_nan_step(self, loss: float) -> None:
        """A step whose loss (or gradient) is NaN/inf: its update would make every weight NaN, and every later
        save a broken file. Without --skip_nan_steps the run stops here with one clear error, before any save;
        with it the step is dropped (no weight changes), counted and reported. Fused backward has already
        applied its update during backward, so it always stops; so does a run whose steps keep failing."""
        cfg = self.cfg
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        self.nan_steps += 1
        self.nan_run += 1
        if not cfg.skip_nan_steps or self.fused or self.nan_run > MAX_NAN_RUN:
            why = ("--fused_backward_pass has already applied it" if cfg.skip_nan_steps and self.fused else
                   f"{self.nan_run} steps in a row failed" if cfg.skip_nan_steps else "")
            raise NumericError(
                f"training step {self.step + 1}: the {what} is "
                f"{'NaN' if what != 'loss' or math.isnan(loss) else 'infinite'}"
                f"{f' ({why})' if why else ''}; the run was stopped before saving anything from this step on "
                f"(saves of earlier steps are kept).",
                "Lower --learning_rate, use --mixed_precision bf16 instead of fp16, check the dataset's caches "
                "(cache again with --skip_existing off) and the DiT/--network_weights files; or add "
                "--skip_nan_steps to drop such steps and go on.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()                                 # the schedule follows the step count, as usual
        log.warning("step %d: %s is NaN/inf; step skipped (--skip_nan_steps), %d so far", self.step + 1, what,
                    self.nan_steps)

    def _mean_loss(self, loss: torch.Tensor) -> float:
        if self.world > 1:
            loss = self.acc.reduce(loss.to(self.device), reduction="mean")
        return float(loss)

    # ------------------------------------------------------------------------------------------ reporting
    def _after_step(self, loss: float) -> None:
        cfg, sch = self.cfg, self.schedule
        if self.ema:
            self.ema.update(self.step)
        if math.isfinite(loss):
            self.losses.append(loss)
        recent = self.losses[-sch.steps_per_epoch:] or [float("nan")]
        done = self.step - self.start_step
        elapsed = time.time() - self.started
        lrs = {f"lr/{g.get('name', i)}": lr for i, (g, lr) in enumerate(zip(self.optimizer.param_groups,
                                                                              self._current_lrs()))}
        if not math.isfinite(loss):                       # a skipped step (--skip_nan_steps): no point on the curve
            loss = float("nan")
        if self.main:
            self.events.progress(self.step, sch.total_steps, unit="step",
                                 eta_s=round(elapsed / done * (sch.total_steps - self.step), 1), epoch=self.epoch + 1)
            extra = {"lrs": lrs} if len(lrs) > 1 else {}              # LoRA+: lr/unet and lr/unet plus
            if self.nan_steps:
                extra["skipped_nan_steps"] = self.nan_steps
            self.events.metric(self.step, loss=round(loss, 6), lr=next(iter(lrs.values())),
                               avg_loss=round(sum(recent) / len(recent), 6), it_s=round(done / elapsed, 4),
                               epoch=self.epoch + 1, **extra)
            if cfg.log_with:
                self.acc.log({"loss/current": loss, "loss/average": sum(recent) / len(recent), **lrs}, step=self.step)
            if self.step == 1 or self.step % 10 == 0 or self.step == sch.total_steps:
                report_memory(self.events, self.device, "training")
        last = self.step >= sch.total_steps           # the final save covers the last step (musubi)
        if not last and cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0:
            self._save(ckpt.model_path(cfg, step=self.step), ckpt.state_path(cfg, step=self.step), "step")
        if samples.is_due(cfg, step=self.step):
            self._sample(self.step, None)
        if self.validation and self.validation.is_due(self.step, sch.total_steps):
            self._validate()

    def _current_lrs(self) -> list[float]:
        """The lr each group used. Adafactor with relative_step computes it from its step count; its schedule
        reads it from parameters that still hold a gradient, which the fused backward has already freed."""
        opt = self.optimizer
        if opt.defaults.get("relative_step") and hasattr(opt, "_get_lr"):
            return [float(opt._get_lr(g, opt.state[g["params"][0]])) if opt.state.get(g["params"][0]) else 0.0
                    for g in opt.param_groups]
        return [float(lr) for lr in self.scheduler.get_last_lr()]

    def _after_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        if self.main and cfg.log_with:
            recent = self.losses[-self.schedule.steps_per_epoch:]
            self.acc.log({"loss/epoch": sum(recent) / len(recent)}, step=epoch)
        last = epoch >= self.schedule.epochs             # the final save covers the last epoch (musubi)
        if not last and cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
            self._save(ckpt.model_path(cfg, epoch=epoch), ckpt.state_path(cfg, epoch=epoch), "epoch", epoch)
        if samples.is_due(cfg, epoch=epoch):
            self._sample(self.step, epoch)

    def _sample(self, step: int, epoch: int | None) -> None:
        if self.prompts is None:
            return
        self.events.phase("sampling", step=step)
        name = self.prompts.name
        for suffix, weights in E.weight_sets(self.ema, self.cfg.ema_validation):
            self.prompts.name = name + suffix
            with weights:
                self.outputs += self.prompts.generate(self.t.dit, step, epoch, self.events, self.t.eval_modules)
        self.prompts.name = name
        if self.step < self.schedule.total_steps:
            self.events.phase("training", total=self.schedule.total_steps)

    def _validate(self) -> None:
        if self.validation is None:
            return
        autocast = self.acc.autocast if self.cfg.mixed_precision != "no" else None
        V.report(self.validation, self.step, self.t, E.weight_sets(self.ema, self.cfg.ema_validation), self.events,
                 self.device, autocast)
        if self.val_images:
            with E.weight_sets(self.ema, self.cfg.ema_validation)[-1][1]:    # the EMA weights when asked for
                self.outputs += self.val_images.render(self.t.dit, self.step, self.events, self.t.eval_modules)
        if self.step < self.schedule.total_steps:
            self.events.phase("training", total=self.schedule.total_steps)

    # ------------------------------------------------------------------------------------------ saving
    def _stats(self) -> dict:
        return {"ss_steps": self.step, "ss_epoch": self.epoch + 1, "ss_num_epochs": self.schedule.epochs,
                "ss_num_batches_per_epoch": self.data.num_batches, "ss_num_train_items": len(self.data.items),
                "ss_optimizer": self.optimizer_text,
                "ss_datasets": [{"dataset_index": i, "batch_size": bs, "num_repeats": self.data.repeats[i],
                                 "num_items": sum(it.dataset_index == i for it in self.data.items)}
                                for i, bs in sorted(self.data.batch_sizes.items())]}

    def _save(self, model_file: Path, state_dir: Path | None, kind: str | None, number: int | None = None,
              with_state: bool | None = None) -> None:
        cfg = self.cfg
        self.acc.wait_for_everyone()
        self._check_finite_weights(model_file)
        if self.main:
            self.events.phase("saving", step=self.step)
        if self.main or self.t.collective_save:
            saved = self.t.save(model_file, self._stats())
            saved += E.save_beside(self.ema, self.t.save, model_file, self._stats())     # [] without --use_ema
            for path in saved:
                self.outputs.append(str(path))
                self.events.checkpoint(str(path), self.step, epoch=self.epoch + 1, kind="model")
        if (cfg.save_state if with_state is None else with_state) and state_dir is not None:
            epoch, micro = self.micro_next
            if micro >= self.schedule.micro_per_epoch:          # the epoch is done: resume at the next one
                epoch, micro = epoch + 1, 0
            progress = {"step": self.step, "epoch": epoch, "micro": micro, "seed": cfg.seed,
                        "batches_per_epoch": self.data.num_batches,
                        "total_steps": self.schedule.total_steps, "world": self.world, "losses": self.losses}
            files = {E.STATE_FILE: self.ema.state_dict()} if self.ema else None
            shards = fsdp.save_shards(self.t.module, self.optimizer) if self.fsdp else None
            ckpt.save_state(self.acc, state_dir, progress, files, shards)
            if self.main:
                self.events.checkpoint(str(state_dir), self.step, epoch=self.epoch + 1, kind="state")
        if self.main and kind:
            for path in ckpt.prune(cfg, kind, number if number is not None else self.step):
                log.info("removed old save %s (--save_last_n_%ss)", path.name, kind)
                self.outputs = [o for o in self.outputs if o != str(path)]
        if self.main and self.step < self.schedule.total_steps:
            self.events.phase("training", total=self.schedule.total_steps)
        self.acc.wait_for_everyone()

    def _check_finite_weights(self, model_file: Path) -> None:
        """Never write a file of NaN weights (it would load, and make black images): the last guard, for a NaN
        that no loss showed (e.g. an overflow inside the optimizer)."""
        bad = next((p for p in self.params if not bool(torch.isfinite(p.detach()).all())), None)
        if bad is not None:
            raise NumericError(f"step {self.step}: the trained weights contain NaN/inf, so {model_file.name} was not "
                               "saved (earlier saves are kept).", "Lower --learning_rate or use --mixed_precision "
                               "bf16, then resume from the last good state or start again.")

    def _save_interrupted(self) -> None:
        """Stopped (SIGINT from the Jobs tab or Ctrl-C): keep what was trained, at the last finished step."""
        if self.step == 0 or not hasattr(self, "micro_next"):
            return
        log.info("stopped at step %d: saving a checkpoint first", self.step)
        self._save(ckpt.model_path(self.cfg, step=self.step), ckpt.state_path(self.cfg, step=self.step), None)

    def _finish(self) -> None:
        cfg = self.cfg
        end_state = cfg.save_state or cfg.save_state_on_train_end
        self._save(ckpt.model_path(cfg), ckpt.state_path(cfg), None, with_state=end_state)
        if self.main:
            report_memory(self.events, self.device, "end")
            if cfg.log_with:
                self.acc.end_training()
            if self.losses:
                log.info("loss: first %.5f, last %.5f (%d steps)", self.losses[0], self.losses[-1], self.step)
            if self.nan_steps:
                log.warning("%d of %d steps were skipped because their loss or gradient was NaN/inf "
                            "(--skip_nan_steps)", self.nan_steps, self.step)
