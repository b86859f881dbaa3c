"""The training loop: one function, `train(recipe, out)`, for 1 process or N under torchrun.

The recipe's `data.objective` (clm, mlm, span, seq2seq; `lmforge.train.objectives`) decides the data,
the batches and how the model is called; everything below is the same for all of them.

Per optimiser step: set the scheduled lr; run `accumulation` micro-batches (the loss of each is its
token-loss sum over the GLOBAL token count of the step, so accumulation and data parallelism give
the gradient of one big batch); clip; skip the update if the loss or gradient is not finite; step.
Under fp16 the loss is scaled before each backward and the gradients unscaled before clipping
(`grad_scaler`); a step whose scaled gradients overflow is skipped and the scale halved, which the
NaN/inf guard counts as an overflow, not as a bad step (`lmforge.train.guard`).
Every `eval.every` steps: validation loss, perplexity and (clm) bits per byte over the first
`eval.batches` validation batches, the same set under any number of processes. Every `checkpoint.every`
steps: an atomic checkpoint with everything needed to continue bit for bit (weights, optimiser,
RNG, loader position, guard, fp16 loss scale). Running again with the same out folder resumes from the latest one,
with its saved tokenizer; what the recipe may change on resume, the folder's lock and what --fresh may delete
are in `lmforge.train.run_dir`. loss.png is redrawn at every evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from lmforge.data.loader import ShardLoader
from lmforge.models import build_model
from lmforge.nn.packed import resolve_matmul, use_onednn_linears
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.allocator import keep_freed_memory
from lmforge.train.distributed import Dist, loadable, parallelize, saveable
from lmforge.train.flops import cached_peak_flops, mfu
from lmforge.train.guard import NonFiniteGuard
from lmforge.train.loss import token_loss
from lmforge.train.metrics import MetricsLogger, ProgressBar, plot_losses
from lmforge.train.objectives import Objective, batch_cost, get_objective, model_config
from lmforge.train.optim import clip_grad_norm, make_optimizer
from lmforge.train.recipe import Recipe, check_model_fits
from lmforge.train.run_dir import check_flags, check_resume, prepare_run_dir, record_resume
from lmforge.train.run_info import write_run_info
from lmforge.train.schedule import lr_factor
from lmforge.train.setup import tokenizer_for

IGNORE_INDEX = -100


def _autocast(recipe: Recipe, device: torch.device):
    if recipe.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The recipe's train.precision made concrete: "auto" is bf16 where `device` computes it natively, else fp32.
    Natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or AMX tiles, whose oneDNN bf16 GEMMs run at
    about twice the fp32 rate (2 threads here: ~1,000 against ~500 GFLOP/s); elsewhere bf16 is emulated, slower
    than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "fp32"


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16: dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", §3.2), torch's
    defaults: scale 2^16, halved on a step whose gradients overflow (that update is skipped), doubled
    after 2000 steps in a row without one. On the run's device type (cuda, or cpu: torch >= 2.3)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def peak_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype whose matmul peak MFU is measured against. fp16 on a CPU: the fp32 peak, because x86
    CPUs without AVX512-FP16 / AMX-FP16 run fp16 matmuls in a slow fallback (here ~2 GFLOP/s, against
    ~100 in fp32), which would take minutes to measure and flatter a slow run."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.type != "cpu":
        return torch.float16
    return torch.float32


def eval_batches(loader: ShardLoader, n_batches: int, d: Dist):
    """This rank's share of the validation set: yields (batch, counted) for `ceil(n_batches / world)` rounds.

    The set is the first `n_batches` batches of a loader built for ONE process (rank 0 of 1, no
    shuffle), i.e. the first `n_batches x micro_batch` validation sequences whatever the number of
    processes; in round k rank r takes batch k x world + r. So summed over ranks the same batches are
    evaluated as by 1 process, each with the same rows (the per-batch sums are the same numbers; only
    the order of the float64 total differs). A rank with no batch left in the last round re-runs batch 0
    with counted=False: every rank makes the same number of forward calls, which FSDP2's all-gathers need.
    """
    if loader.world_size != 1 or loader.shuffle:
        raise ValueError("eval_batches needs the unshuffled single-process validation loader "
                         f"(world_size=1, shuffle=False), got world_size={loader.world_size}, shuffle={loader.shuffle}")
    for first in range(0, n_batches, d.world):
        index = first + d.rank
        counted = index < n_batches
        epoch, step = divmod(index if counted else 0, loader.steps_per_epoch)  # past an epoch: wrap, as next() does
        yield loader.batch(epoch, step), counted


@torch.no_grad()
def evaluate(model, loader: ShardLoader, recipe: Recipe, objective: Objective, d: Dist,
             n_bytes: float | None) -> dict[str, float]:
    """Validation loss (nats per label token) and perplexity over the first `eval.batches` batches of the
    validation split (see `eval_batches`: the same set under any number of processes); bits per byte too
    when `n_bytes` (the UTF-8 bytes of those labels) is given."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch, counted in eval_batches(loader, recipe.eval.batches, d):
        with _autocast(recipe, d.device):
            out = objective.forward(model, batch, d.device)
        if counted:
            loss_sum, n = token_loss(out.logits, batch["labels"].to(d.device))
            totals += torch.stack([loss_sum.double().cpu(), n.double().cpu()])
    model.train()
    loss_sum, n = d.sum(totals).tolist()
    loss = loss_sum / n
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if n_bytes is not None:
        result["val_bpb"] = loss_sum / math.log(2) / n_bytes
    return result


def _eval_bytes(loader: ShardLoader, recipe: Recipe, tokenizer, d: Dist) -> float:
    """UTF-8 bytes of the validation labels evaluated (all ranks), for bits per byte."""
    n = 0
    for batch, counted in eval_batches(loader, recipe.eval.batches, d):
        for row in batch["labels"] if counted else ():
            n += len(tokenizer.decode(row[row != IGNORE_INDEX].tolist()).encode("utf-8", "surrogatepass"))
    return float(d.sum(torch.tensor(float(n), dtype=torch.float64)).item())


def _run_tokenizer(recipe: Recipe, out: Path, resuming: bool, objective: Objective, say) -> Tokenizer:
    """A resumed run's own tokenizer (RUN_DIR/tokenizer, saved at its start), else the recipe's (cached).

    The saved one is what the checkpoints were trained with, even when the cache has been cleared or its
    corpus has changed since; when the cache still holds it the two are the same tokenizer (same
    fingerprint, hence the same cached shards), and loading it spares rebuilding the cache entry."""
    saved = out / "tokenizer"
    if resuming and (saved / "tokenizer.json").is_file():
        return Tokenizer.load(saved)
    return tokenizer_for(recipe.data, log=say, pairs=objective.pairs)


def train(recipe: Recipe, out: str | Path, *, fresh: bool = False, overwrite: bool = False, log=print) -> dict:
    """Run (or resume) `recipe` in folder `out`; returns the last metrics.

    Rank 0 holds a lock on `out` for the whole run (`lmforge.train.run_dir`): a second run on the same
    folder fails at once. A resumed run may change the schedule-like settings of its recipe, not what
    its checkpoints are made of (`run_dir.check_resume`)."""
    out = Path(out)
    check_flags(fresh, overwrite)
    check_model_fits(recipe)  # load_recipe checks it too; recipes built in Python (recipe_from_dict) need it here
    d = Dist(recipe.train.device)
    if recipe.train.precision == "auto":
        precision = resolve_precision("auto", d.device)
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, precision=precision))
        if d.main:
            log(f"train.precision auto: {precision} on {d.device.type}")
    with contextlib.ExitStack() as cleanup:
        if d.main:
            cleanup.enter_context(prepare_run_dir(out, fresh, overwrite))
        d.barrier()
        return _train(recipe, out, d, log if d.main else (lambda *a, **k: None), cleanup)


def _train(recipe: Recipe, out: Path, d: Dist, say, cleanup: contextlib.ExitStack) -> dict:
    """`train` in the prepared (and on rank 0 locked) run folder; `cleanup` closes what it opens."""
    seed, steps, b = recipe.train.seed, recipe.train.steps, recipe.batch
    accumulation, rest = divmod(b.global_batch, b.micro_batch * d.world)
    if rest or accumulation < 1:
        raise ValueError(f"batch.global_batch={b.global_batch} must be a multiple of batch.micro_batch "
                         f"({b.micro_batch}) x processes ({d.world})")
    latest = d.from_main(lambda: ckpt.latest_checkpoint(out))  # rank 0 hashes the files, the others take its pick
    changes = check_resume(out, recipe) if latest is not None else []  # before any data work; every rank

    objective = get_objective(recipe.data.objective)
    # build the cached tokenizer and shards once per node (the cache may be node-local), the other ranks wait
    if d.local_main:
        tokenizer = _run_tokenizer(recipe, out, latest is not None, objective, say)
        objective.prepare(recipe.data, tokenizer, seed, log=say)
    d.barrier()
    tokenizer = _run_tokenizer(recipe, out, latest is not None, objective, say)
    train_src, val_src = objective.open(objective.prepare(recipe.data, tokenizer, seed, log=say), tokenizer)

    cfg = model_config(recipe.model.preset, recipe.model.overrides, tokenizer)
    objective.check(cfg, recipe.data)
    if recipe.train.keep_freed_memory and d.device.type == "cpu":
        keep_freed_memory()  # process-wide; a no-op off glibc
    torch.manual_seed(seed)
    model = build_model(cfg, device=d.device, seed=seed)
    if resolve_matmul(recipe.train.matmul, d.device, recipe.train.precision) == "onednn":
        use_onednn_linears(model)  # switches matmul functions only: before wrapping, same state_dict
    runner = parallelize(model, recipe.train, d)  # before the optimizer: FSDP2 swaps in sharded parameters
    optimizer = make_optimizer(model, recipe.optim)
    guard = NonFiniteGuard(max_consecutive=recipe.train.max_bad_steps)
    scaler = grad_scaler(recipe.train.precision, d.device)
    loader = objective.loader(train_src, recipe, tokenizer, rank=d.rank, world_size=d.world, shuffle=True)
    # every rank reads the whole validation order; `eval_batches` gives each its share of one fixed set
    val_loader = objective.loader(val_src, recipe, tokenizer, shuffle=False)

    start = 0
    if latest is not None:
        model_in, optimizer_in = loadable(model, optimizer)  # FSDP2: each rank takes its shard of the full state
        # rank 0's latest_checkpoint verified its checksums just now
        state = ckpt.load_checkpoint(latest, model=model_in, optimizer=optimizer_in, verify=False)
        start = state["step"]
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state["guard"])
        if scaler is not None and "scaler" in state:  # absent when the run was not fp16 before
            scaler.load_state_dict(state["scaler"])
        say(f"resuming {out} from step {start} ({latest.name})")
        if d.main:
            record_resume(out, recipe, changes, start, say)
    elif d.main:
        tokenizer.save(out / "tokenizer")
        write_run_info(out, recipe, cfg, tokenizer)
    metrics = cleanup.enter_context(MetricsLogger(out)) if d.main else None
    if metrics is not None:
        metrics.truncate_after(start)

    peak_as = peak_dtype(recipe.train.precision, d.device)
    if d.local_main:  # measured (once per machine) while the other ranks wait, not under their load
        cached_peak_flops(peak_as, d.device.type)
    d.barrier()
    peak = cached_peak_flops(peak_as, d.device.type) * d.world
    remeasured = False
    eval_bytes = _eval_bytes(val_loader, recipe, tokenizer, d) if objective.bits_per_byte else None
    bar = ProgressBar(steps, start, enabled=d.main)
    cleanup.callback(bar.close)
    last: dict = {}
    model.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = recipe.optim.lr * lr_factor(recipe.schedule, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(loader) for _ in range(accumulation)]
        n_labels = sum((m["labels"] != IGNORE_INDEX).sum() for m in micro).item()
        tokens, flops = (sum(c) for c in zip(*(batch_cost(cfg, m) for m in micro)))
        counts = d.sum(torch.tensor([n_labels, tokens, flops], dtype=torch.float64))  # one all-reduce
        n_global, step_tokens, step_flops = counts[0], counts[1].item(), counts[2].item()
        loss_total = torch.zeros((), dtype=torch.float64)
        scale = scaler.get_scale() if scaler else None  # this step's loss scale, before update() changes it
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if d.world == 1 or i == accumulation - 1 else runner.no_sync()
            with sync:
                with _autocast(recipe, d.device):
                    output = objective.forward(runner, batch, d.device)
                loss_sum, _ = token_loss(output.logits, batch["labels"].to(d.device),
                                         label_smoothing=recipe.train.label_smoothing)
                aux = sum(output.aux_losses.values(), torch.zeros((), device=d.device)) / accumulation
                # DDP averages gradients over ranks: scale by world so the result is sum / n_global
                loss = loss_sum * (d.world / n_global.to(loss_sum.device)).float() + aux
                (scaler.scale(loss) if scaler else loss).backward()
            loss_total += loss_sum.detach().double().cpu()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(model, recipe.optim.grad_clip)
        train_loss = (d.sum(loss_total) / n_global.cpu()).item()
        done = step + 1
        overflows = guard.overflows
        if guard.check(train_loss, grad_norm, step=done, scale=scale):
            (scaler.step(optimizer) if scaler else optimizer.step())
        if scaler:
            scaler.update()  # found inf / nan in unscale_: halve the scale, else count toward growth
        optimizer.zero_grad(set_to_none=True)
        if guard.overflows > overflows:
            bar.write(f"step {done}: fp16 gradients overflowed at loss scale {scale:g}; update skipped, "
                      f"scale halved to {scaler.get_scale():g}")
        seconds = time.perf_counter() - t0
        utilisation = mfu(step_tokens / seconds, step_flops / step_tokens, peak)
        if utilisation > 1.0 and not remeasured and d.device.type == "cpu":
            # beyond the peak: the cached one was measured under load; measure again (every rank: same figure)
            remeasured = True
            peak = cached_peak_flops(peak_as, d.device.type, remeasure=True) * d.world
            utilisation = mfu(step_tokens / seconds, step_flops / step_tokens, peak)
        last = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": step_tokens / seconds,
                "mfu": utilisation, "skipped": guard.skipped}
        if scaler:
            last.update(scale=scale, overflows=guard.overflows)
        if done % recipe.eval.every == 0 or done == steps:
            last.update(evaluate(runner, val_loader, recipe, objective, d, eval_bytes))
            bpb = f"  bpb {last['val_bpb']:.3f}" if "val_bpb" in last else ""
            bar.write(f"step {done}: train {train_loss:.4f}  val {last['val_loss']:.4f}  "
                      f"ppl {last['val_ppl']:.2f}{bpb}")
        if metrics is not None:
            metrics.log(done, **last)
            if "val_loss" in last:
                plot_losses(out)  # at every evaluation
        bar.update(done, loss=train_loss, lr=lr, tokens_per_s=last["tokens_per_s"], mfu=last["mfu"])
        if done % recipe.checkpoint.every == 0 or done == steps:
            model_out, optimizer_out = saveable(model, optimizer)  # FSDP2: the full state, gathered to rank 0
            if d.main:
                state = {"step": done, "loader": loader.state_dict(), "guard": guard.state_dict(),
                         "val_loss": last.get("val_loss")}
                if scaler:  # plain numbers (scale, growth tracker, factors): JSON like the rest of state
                    state["scaler"] = scaler.state_dict()
                ckpt.save_checkpoint(out, done, model=model_out, optimizer=optimizer_out, state=state,
                                     metric=last.get("val_loss"), keep_last=recipe.checkpoint.keep_last)
            d.barrier()
    bar.close()
    if metrics is not None:
        metrics.close()
    d.close()
    return last
