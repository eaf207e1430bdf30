"""
The run every training script shares: not a script. mim.py (pre-training), finetune.py, detect.py and
segment.py each define their model, data and recipe, and use this file for the rest: joining torchrun's
processes, the training loop, the run directory that makes a kill at any moment harmless, and the
command-line types that refuse a bad flag before any work starts.

A script's main() reads straight down:

    with train.session(out_dir, args.dist_timeout) as (run, device, rank, world):
        ... the model and optimizer ...
        state, done = run.start(identity, raw_model, optimizer, master, iters)   # lock, resume
        train.loop(run, r, state, device, model=..., loss_fn=..., evaluate=..., ...)

Reading order: the session and the loop come first, because they are what a reader of a training script
comes here for; the machinery follows in the order the loop meets it: what a log row gathers and stop
signals; the optimizer (LR schedules, weight-decay groups, a fused AdamW that skips a non-finite step on
the device); the run directory (atomic files, lock, identity, resume with the log cut back to the
checkpoint); processes and the device; loading a checkpoint for --eval_only; the argparse types.

Randomness is a pure function of (seed, step, sample position), so the same global batches come
whatever the world size or accumulation, and a resumed run continues exactly where it stopped.
Read mim.py first; read next: finetune.py.
"""
import argparse
import contextlib
import datetime
import errno
import fcntl
import glob
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import swinv2



# -----------------------------------------------------------------------------
# the session and the loop


@contextlib.contextmanager
def session(out_dir, timeout_min=60, tensorboard=False):
    """Join torchrun's processes and open the run directory, for the `with` block of a script's main:

        with train.session(out_dir, args.dist_timeout) as (run, device, rank, world):

    However the block ends (it returns, raises, or a signal ends it through sys.exit), the directory's
    lock and the process group are let go, so a rerun or the next test finds them free. timeout_min
    bounds every collective (see setup_distributed); tensorboard: see RunDir.events."""
    rank, _, world, device = setup_distributed(timeout_min)
    run = RunDir(out_dir, rank == 0, tensorboard)
    try:
        yield run, device, rank, world
    finally:
        run.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def loop(run, r, state, device, *, model, raw_model, optimizer, stream, batches, loss_fn, lr_at, evaluate, keep):
    """The training loop of every script. Per optimizer step: set each group's LR; run r['accum']
    micro-batches, gradients summed (DDP all-reduces them on the last one only); step, or skip a step
    whose gradient is not finite. Then the boundary: a log row every r['log_every'] steps, an evaluation
    every r['eval_every'] and at the end, a checkpoint every r['save_every'] and at the end, and a stop
    if SIGTERM/Ctrl-C came.

    A stop is honoured before an evaluation starts (torchrun and SLURM allow ~30 s after SIGTERM; a
    50K-image validation does not fit), and the last step's checkpoint is written before the final
    evaluation, so a kill there loses no training. An evaluation skipped that way is due: a resumed run
    makes it first, so its log equals an uninterrupted run's.

    loss_fn(batch) -> (loss, {name: term}) runs the forward of one micro-batch (a data.Item of batched
    fields); lr_at(step, scale) is the LR of a parameter group with that lr_scale; evaluate(step) ->
    {metric: value}, on every rank. A checkpoint holds the weights, the optimizer, the loop's state, the
    latest evaluation's `metrics`, and the script's `keep` (identity, args, model_config, ...), where a key
    that is also a metric takes the latest value (mim.py's val_loss). `state` is RunDir.start's.
    Randomness: data.py's stream fixes the data of each step; drop path (and mixing) are seeded by (seed,
    step, micro-batch)."""
    master, world = run.master, dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    tally, stop = Tally(state, stream, world), StopSignal()
    at = dict(metrics=state.get("metrics", {}), evaluated=state.get("evaluated", state["step"]))  # the last evaluation
    bar = tqdm(total=r["iters"], initial=state["step"], disable=not master, dynamic_ncols=True)
    due = lambda done: done % r["eval_every"] == 0 or done == r["iters"]

    def save(done):
        """The checkpoint of step `done`, unless non-finite steps are open: a rerun must meet them from their start."""
        tally.settle(device)
        if tally.streak:
            bar.write(f"step {done}: not saved, the last {tally.streak} steps were not finite", file=sys.stderr)
            if done == r["iters"]:
                fail(f"the last {tally.streak} steps were not finite: the final checkpoint was not written", master)
            return
        latest = {k: at["metrics"].get(k, v) for k, v in keep.items()}  # keep's metric keys, up to date
        run.save(raw_model, optimizer, done, loop=dict(tally.state(), evaluated=at["evaluated"]), metrics=at["metrics"],
                 **latest)

    def measure(done):
        at["metrics"], at["evaluated"] = evaluate(done), done
        run.log(step=done, **at["metrics"])

    try:
        if state["step"] and at["evaluated"] != state["step"] and due(state["step"]):  # stopped before this evaluation
            measure(state["step"])
            save(state["step"])
        for step in range(state["step"], r["iters"]):
            # ---- the step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, group["lr_scale"])
            losses = []
            for micro in range(r["accum"]):
                t = time.time()
                batch = next(batches)  # a data.Item of batched fields
                tally.wait += time.time() - t
                tally.note_bad(batch.pos, batch.bad)
                torch.manual_seed(micro_seed(r["seed"], step, micro * world + rank))
                with model.no_sync() if world > 1 and micro < r["accum"] - 1 else contextlib.nullcontext():
                    loss, terms = loss_fn(batch)
                    # gradients add up over micro-steps: divide so that their sum is the mean over the global batch
                    (loss / r["accum"]).backward()
                losses.append(torch.stack([loss.detach()] + [t.detach() for t in terms.values()]).float())
            taken, norm = optimizer_step(raw_model, optimizer, r["clip_grad"])
            mean = torch.stack(losses).mean(0)  # (1 + terms,): the step's losses
            tally.add(mean[0], dict(zip(terms, mean[1:])), taken, norm)
            done, last = step + 1, step + 1 == r["iters"]
            bar.update()

            # ---- the boundary: log, stop, evaluate, save (the loop's only host syncs)
            if done % r["log_every"] == 0 or last:
                row = tally.row(done, done / r["epoch_steps"], lr_at(step, 1.0), r["batch_size"], device)
                run.log(**row)
                bar.set_postfix(loss=f"{row['train_loss'] or math.nan:.4f}", lr=f"{row['lr']:.2e}",
                                img_s=f"{row['img_per_s']:.0f}")
            if tally.streak >= MAX_NON_FINITE:
                fail(f"{tally.streak} non-finite steps in a row (gradient norm NaN or inf), the last at step {done}: "
                     f"the weights have diverged. The last good checkpoint is {run.ckpt} (made before the streak); a "
                     f"rerun repeats the same steps. Lower --lr, or look at the data", master)
            signum = stop.requested()
            if signum or last:  # the weights are safe before an evaluation starts; a stop does not wait for it
                save(done)
            if signum:
                bar.write(f"stopped at step {done}; run the same command again to resume", file=sys.stderr)
                sys.exit(128 + signum)  # not 0: `mim.py ... && finetune.py ...` and SLURM's afterok stop here
            if due(done):
                measure(done)
            if done % r["save_every"] == 0 or last:
                save(done)
    finally:
        bar.close()
        stop.restore()




# -----------------------------------------------------------------------------
# what the loop needs: a log row's gathering, stop signals, seeds


class StopSignal:
    """SIGTERM (preemption) or Ctrl-C (SIGINT) asks the run to stop: the loop saves a checkpoint at the end
    of the step and exits 128 + the signal (143 after SIGTERM, 130 after Ctrl-C, as a shell expects: a run that
    did not reach its end is not a success, so chained commands and SLURM dependencies stop). A second Ctrl-C stops at
    once; a second SIGTERM changes nothing (schedulers often send one to every process of a job, and
    torchrun forwards its own). Every rank must stop at the same step, so `requested()` all-reduces the
    flags: a CPU tensor on a gloo group, which waits for the other processes but never for the GPU."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        nccl = dist.is_initialized() and dist.get_backend() != "gloo"
        self.group = dist.new_group(backend="gloo") if nccl else None

    def handle(self, signum, frame):
        if self.signum is None:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name}: saving at the end of this step, then stopping{again}",
                  file=sys.stderr, flush=True)
            self.signum = signum
        elif signum == signal.SIGINT:
            print("\nCtrl-C again: stopped at once; the last checkpoint stays", file=sys.stderr, flush=True)
            os._exit(130)

    def requested(self):
        flag = torch.tensor([self.signum or 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def micro_seed(seed, step, chunk):
    """Seed of drop path (and fine-tuning's mixing) for micro-batch `chunk` (= micro-step * world + rank)."""
    return (seed * 1_000_003 + step) * 4096 + chunk


MAX_NON_FINITE = 10  # non-finite steps in a row that stop a run: its gradients are broken, not one batch


class Tally:
    """What the loop tallies between two log rows: each step's losses (averaged over ranks on the device:
    no host sync per step) and whether the step was taken, the last gradient norm, unreadable images.
    settle() brings it to the host at log and save boundaries. The checkpoint keeps it, so the first row
    after a resume averages the same steps, to the bit, as an uninterrupted run's; the totals (skipped
    steps, unreadable images and files) run over the whole run."""

    def __init__(self, loop, stream, world):
        self.steps = loop.get("steps", [])  # settled steps: [loss, *terms, taken]
        self.skipped, self.streak = loop.get("skipped", 0), 0  # never saved with a streak open: it is 0
        self.bad, self.bad_files = loop.get("bad", 0), set(loop.get("bad_files", []))
        self.stream, self.world, self.names = stream, world, None
        self.pending, self.my_bad, self.my_files, self.norm = [], 0, set(), None
        self.timed, self.wait, self.t0 = 0, 0.0, time.time()

    def add(self, losses, terms, taken, norm):
        """One optimizer step: its losses (the mean over micro-steps), as a device tensor."""
        self.names = list(terms)
        v = torch.stack([losses.detach().float()] + [t.detach().float() for t in terms.values()])
        if dist.is_initialized():
            dist.all_reduce(v)  # each step on its own: a sum over ranks is then the same however many steps a row has
            v = v / self.world
        self.pending.append(torch.cat([v, taken.float().view(1)]))
        self.norm, self.timed = norm, self.timed + 1

    def note_bad(self, pos, bad):
        """Unreadable files skipped for a micro-batch (from its items' positions and skip counts)."""
        for p, n in zip(pos.tolist(), bad.tolist()):
            if n:
                self.my_bad += n
                for i in self.stream.skipped(p, n):
                    if i not in self.bad_files and i not in self.my_files:
                        tqdm.write(f"unreadable image {data.failure(self.stream.dataset, i)}: "
                                   f"replaced by another sample")
                    self.my_files.add(i)

    def settle(self, device):
        """The host side of a boundary (every rank): the pending steps' values (one sync), the streak of
        non-finite steps, and the unreadable images of all ranks."""
        for s in torch.stack(self.pending).tolist() if self.pending else []:
            self.steps.append(s)
            self.streak = 0 if s[-1] else self.streak + 1
            self.skipped += not s[-1]
        self.pending = []
        bad = int(all_sum(self.my_bad, device=device)[0])
        if bad:  # rare: gather the names
            files = [self.my_files] * self.world
            if dist.is_initialized():
                dist.all_gather_object(files, self.my_files)
            self.bad, self.bad_files = self.bad + bad, self.bad_files.union(*files)
        self.my_bad, self.my_files = 0, set()

    def row(self, step, epoch, lr, batch_size, device):
        """The log row of the steps since the last one, averaged over the steps taken."""
        self.settle(device)
        taken = [s for s in self.steps if s[-1]]
        mean = lambda i: sum(s[i] for s in taken) / len(taken) if taken else None
        dt, wait = time.time() - self.t0, all_sum(self.wait, device=device)[0] / self.world
        terms = {n: mean(i + 1) for i, n in enumerate(self.names)}
        row = dict(step=step, epoch=epoch, lr=lr, train_loss=mean(0), **terms,
                   grad_norm=float(self.norm), img_per_s=self.timed * batch_size / dt, data_wait=wait / dt,
                   skipped_steps=self.skipped, bad_images=self.bad, bad_files=len(self.bad_files))
        self.steps, self.timed, self.wait, self.t0 = [], 0, 0.0, time.time()
        return row

    def state(self):
        return dict(steps=self.steps, skipped=self.skipped, bad=self.bad, bad_files=sorted(self.bad_files))



# -----------------------------------------------------------------------------
# the optimizer: LR schedules, weight-decay groups, a step that skips non-finite gradients, DDP


def get_lr(step, peak_lr, start_lr, warmup_iters, iters, milestone=None, min_lr=0.0, schedule="step"):
    """LR of optimizer step `step` (0-based). 1) linear warmup from start_lr to peak_lr over
    warmup_iters; 2) 'step': peak, x0.1 from `milestone` on (pre-training); 'cosine': half a cosine
    from peak to min_lr over the remaining steps (fine-tuning). (Official quirk we do not copy: its
    scheduler runs steps 0 and 1 both at the warmup LR.)"""
    if step < warmup_iters:
        return start_lr + (peak_lr - start_lr) * step / warmup_iters
    if schedule == "step":
        return peak_lr * (0.1 if step >= milestone else 1.0)
    t = (step - warmup_iters) / max(1, iters - warmup_iters)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay, skip=("mask_token",), layer_scale=None):
    """AdamW groups: no weight decay on 1-D parameters, biases and names containing a `skip` entry.
    layer_scale(name) -> float adds layer-wise LR scales (fine-tuning); one group per (scale, decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or any(s in name for s in skip)
        scale = layer_scale(name) if layer_scale else 1.0
        key = (scale, not no_decay)
        groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                "lr_scale": scale})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def adamw(groups, lr):
    """AdamW (0.9, 0.999), eps 1e-8, as the official code. Fused (one kernel for all tensors, on CPU too),
    because the fused kernel can skip a step on the device (see optimizer_step)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def optimizer_step(raw_model, optimizer, clip_grad):
    """Clip the gradient norm to clip_grad (0: no clipping) and step, unless the norm is NaN or inf:
    then the fused AdamW skips the whole update on the device (`found_inf`, the hook torch's GradScaler
    uses), so the decision costs no host sync. The gradient is already all-reduced, so every rank sees
    the same norm and skips together. Returns (taken, norm) as device tensors."""
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad or math.inf)
    taken = torch.isfinite(norm)
    optimizer.found_inf = (~taken).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return taken, norm


def ddp(model, device):
    """DDP: gradients all-reduced in buckets during backward. gradient_as_bucket_view makes each .grad a
    view into its bucket instead of a copy (4 bytes per parameter saved: 4.2 GB for g). Buffers are not
    re-broadcast at every forward: ours are computed from the sizes (the same on every rank) or are
    BatchNorm statistics that each process keeps (SyncBatchNorm on GPUs). Torch 2.14 renamed the switch
    (broadcast_buffers -> forward_sync_buffers, with a FutureWarning per rank for the old name)."""
    new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
    sync = "forward_sync_buffers" if new_name else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **{sync: False})



# -----------------------------------------------------------------------------
# the run directory: files written whole, one run at a time, a log that resumes exactly


def atomic_write(path, write):
    """Write via a temp file, fsync, rename: a reader (or a restart after a kill) sees the old file or
    the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite(obj):
    """obj with NaN and inf replaced by None (JSON has no NaN; a NaN result must not pass for a number)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(finite(obj), indent=1) + "\n").encode()))


def load_checkpoint(path, need=()):
    """torch.load(weights_only=True) of a checkpoint, or a one-line ValueError that says what is wrong
    and what to do; the file itself is never changed. mmap: tensors are read when used, so reading the
    encoder of a g checkpoint does not load its 8 GB of AdamW state on every rank."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, empty, garbage, or pickled classes: torch raises many kinds
        if "GLOBAL" in str(e):  # a complete file that pickles a class (the official yacs config)
            what = re.search(r"GLOBAL ([\w.]+)", str(e))[1]
            raise ValueError(f"{path} pickles {what}, which weights_only loading refuses; if you trust the file, "
                             f"keep its weights: python -c \"import torch; torch.save({{'model': "
                             f"torch.load('{path}', weights_only=False)['model']}}, 'weights.pt')\" "
                             f"and use weights.pt") from None
        why = "an empty file" if os.path.getsize(path) == 0 else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        raise ValueError(f"{path} is not a readable checkpoint ({why}); it was left as it is: move it away to start "
                         f"over (mv {path} {path}.broken)") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this script (no {', '.join(missing)}); it was left as it is: "
                         f"move it away to start over (mv {path} {path}.broken)")
    return ckpt


class RunDir:
    """A run directory (--out_dir): args.json, log.jsonl, ckpt.pt, summary.json, and what the script adds.

    - One run at a time: rank 0 holds an OS lock (lockf) on `.lock` while the run lasts; a second process
      on the directory is refused. The OS drops the lock when its holder dies, even by SIGKILL.
    - Files are written atomically (temp file + rename), except log.jsonl, which is appended row by row
      and, on resume, cut back to the rows the checkpoint covers (it records their number): the rows
      after them were written by the interrupted run and are written again, identically, by the resumed one.
    - A checkpoint records the identity of its run (identity_of); a run with another identity is refused.
    - With --tensorboard, the scalars of log.jsonl are also TensorBoard events in the folder (see events)."""

    def __init__(self, path, master, tensorboard=False):
        self.path, self.master, self.lock = path, master, None
        self.ckpt = self.file("ckpt.pt")
        self.logged = 0  # rows in log.jsonl: a checkpoint records how many it covers
        self.tensorboard, self.writer = tensorboard, None

    def file(self, name):
        return os.path.join(self.path, name)

    def acquire(self):
        """Rank 0: create the folder, take the lock, remove the temp files of a killed save. Returns an
        error message (the folder is in use, or its file system has no locks) or None. The lock is a POSIX
        record lock (lockf): it belongs to this process alone, so the DataLoader workers it forks do not
        inherit it (a flock would follow their copies of the descriptor and outlive a SIGKILL of this
        process until they notice and exit), and it is the kind network file systems support."""
        new = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        self.lock = open(self.file(".lock"), "a+")
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EACCES, errno.EAGAIN)
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.release(clear=False)
            if new:  # a start refused before any work leaves no new folder behind
                os.remove(self.file(".lock"))
                os.rmdir(self.path)
            if busy:
                return f"{self.path} is in use by {holder}: wait for it to end, or use another --out_dir"
            return (f"--out_dir {self.path}: its file system cannot lock files ({os.strerror(e.errno)}); without a "
                    f"lock two jobs could write one run at once: use a run directory on a local or lock-capable "
                    f"file system")
        self.lock.truncate(0)
        self.lock.write(f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        self.lock.flush()
        for tmp in glob.glob(self.file("*.tmp*")):  # we hold the lock: nobody else is writing them
            os.remove(tmp)
        return None

    def release(self, clear=True):
        """Let the lock go (closing the file releases it); the file no longer names this process."""
        if self.writer:
            self.writer.close()
            self.writer = None
        if self.lock:
            if clear:
                self.lock.truncate(0)
                self.lock.flush()
            self.lock.close()
            self.lock = None

    def start(self, identity, raw_model, optimizer, master, iters):
        """Every script's way in (every rank): take the lock (all ranks stop if rank 0 cannot), resume, say
        where the run stands. Returns (loop state, summary): summary is the finished run's summary.json, so
        rerunning a complete run only says so, else None."""
        agree(self.acquire() if master else None, master)
        loop = self.resume(identity, raw_model, optimizer, master)
        if loop["step"] == iters and os.path.exists(self.file("summary.json")):
            print0(f"this run is complete (step {iters}): {self.file('summary.json')}")
            return loop, json.load(open(self.file("summary.json")))
        if loop["step"]:
            print0(f"resumed from {self.ckpt} at step {loop['step']}")
        if self.tensorboard and master:
            self.events()
        print0(f"{'run directory':>14} {self.path}: log.jsonl, ckpt.pt, summary.json at the end")
        return loop, None

    def finish(self, summary):
        """Write summary.json, the sign that the run is complete, and say where the run's files are (rank 0)."""
        if self.writer:
            self.writer.flush()
        save_json(self.file("summary.json"), summary)
        print0(f"done: {self.file('summary.json')} (log.jsonl and ckpt.pt beside it)")

    def resume(self, identity, raw_model, optimizer, master):
        """Continue from ckpt.pt if there is one (every rank): refuse another run's checkpoint, restore the
        weights, the optimizer and the loop's state, cut log.jsonl back to the rows the checkpoint covers. Returns
        the loop state (a fresh one without a checkpoint)."""
        if not os.path.exists(self.ckpt):
            if master and os.path.exists(self.file("log.jsonl")):  # killed before its first checkpoint
                os.remove(self.file("log.jsonl"))
            return dict(step=0)
        try:
            ckpt = load_checkpoint(self.ckpt, need=("model", "optimizer", "step", "identity", "loop"))
        except ValueError as e:
            fail(e, master)
        differ = [f"{'--' if k in vars_of(identity) else ''}{k} {ckpt['identity'].get(k)} there, {identity.get(k)} here"
                  for k in sorted(set(identity) | set(ckpt["identity"])) if ckpt["identity"].get(k) != identity.get(k)]
        if differ:
            fail(f"{self.ckpt} belongs to another run: {'; '.join(differ)}. Rerun with its flags, or use another "
                 f"--out_dir", master)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if master:  # (checkpoints written before log_rows existed cover the rows up to their step)
            self.cut_log(ckpt.get("log_rows", sum(row["step"] <= ckpt["step"] for _, row in self.rows())))
        return dict(ckpt["loop"], step=ckpt["step"], metrics=ckpt.get("metrics", {}))

    def rows(self):
        """The rows of log.jsonl, up to the first one a kill cut in half."""
        rows = []
        if os.path.exists(self.file("log.jsonl")):
            for line in open(self.file("log.jsonl")):
                try:
                    rows.append((line, json.loads(line)))
                except ValueError:
                    break
        return rows


    def counters(self):
        """What every summary.json reports besides its results, from the log's last training row: steps
        skipped as non-finite, unreadable images (occurrences) and files (distinct)."""
        last = [row for _, row in self.rows() if "train_loss" in row][-1]
        return {k: last[k] for k in ("skipped_steps", "bad_images", "bad_files")}

    def cut_log(self, rows):
        """Keep the first `rows` rows, byte for byte: those the checkpoint covers. (Not 'the rows of steps up to
        the checkpoint's': at the last step the checkpoint comes before the final evaluation's row.)"""
        keep = [line for line, _ in self.rows()[:rows]]
        atomic_write(self.file("log.jsonl"), lambda f: f.write("".join(keep).encode()))
        self.logged = len(keep)

    def log(self, **row):
        """Append a row to log.jsonl (rank 0). NaN or inf become null: a failed number is not a number."""
        if self.master:
            with open(self.file("log.jsonl"), "a") as f:
                f.write(json.dumps(finite(row)) + "\n")
            self.logged += 1
            if self.writer:
                self.scalars(row)
                self.writer.flush()  # a row every log_every steps: cheap, and a watcher sees it now

    def events(self):
        """--tensorboard: TensorBoard event files in the run directory, made from log.jsonl, the record. At
        every start the old event files are deleted and the log's rows (cut back to the checkpoint) written
        again, so a resumed run has each step once and in order, however the last one was killed; purge_step=0
        tells a TensorBoard that is watching to drop what it had read. Then every new row is written as it
        is logged. `tensorboard --logdir study/` shows each run directory as one run."""
        from torch.utils.tensorboard import SummaryWriter  # optional: the flag checked that it imports
        for old in glob.glob(self.file("events.out.tfevents.*")):
            os.remove(old)
        self.writer = SummaryWriter(self.path, purge_step=0)
        for _, row in self.rows():
            self.scalars(row)
        self.writer.flush()

    def scalars(self, row):
        """A log row's numbers as scalars at its step, tagged with their log.jsonl keys (val_loss, top1, lr)."""
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])

    def save(self, raw_model, optimizer, step, **meta):
        """Rank 0 writes ckpt.pt: a plain dict, loadable with torch.load(weights_only=True): model (unwrapped,
        uncompiled, official key names), optimizer, step (completed optimizer steps), plus meta. The log rows it
        covers are fsynced first. Every rank waits for the file, so none runs ahead or exits before it exists."""
        if self.master:
            with open(self.file("log.jsonl"), "a") as f:
                os.fsync(f.fileno())
            state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         log_rows=self.logged, **meta)
            atomic_write(self.ckpt, lambda f: torch.save(state, f))
        if dist.is_initialized():
            dist.barrier()


def vars_of(identity):
    """The keys of an identity that are flags (the others describe the data's content)."""
    return {k for k in identity if not k.startswith("data_")}



# Flags that never change what a run computes: free to change when a run resumes (see RunDir.resume).
# Each script adds its own (e.g. its evaluation subset) and passes the set to identity_of.
# The data is identified by its content (size and hash), so its path may change between jobs.
FREE = {"micro_batch", "workers", "compile", "grad_ckpt", "eval_every", "log_every", "save_every", "out_dir",
        "eval_only", "dist_timeout", "data", "val_data", "tensorboard"}


def identity_of(args, r, free, **content):
    """What a run computes: every flag not in `free` (the script's FREE), at its resolved value, plus the
    data's content (`content`: sizes and hashes). A checkpoint with another identity belongs to another run."""
    flags = {k: r.get(k, v) for k, v in vars(args).items() if k not in free}
    return dict(flags, **content)



# -----------------------------------------------------------------------------
# processes and the device: torchrun, numbers summed over ranks, bf16 autocast, workers


def setup_distributed(timeout_min=60):
    """The torchrun contract: RANK, LOCAL_RANK, WORLD_SIZE in the environment, else one process.
    timeout_min bounds every collective: the other ranks wait that long while rank 0 alone works (COCO's
    evaluation of 5,000 images; NCCL's own default, 10 minutes, is too short). Returns (rank, local_rank,
    world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_min))
    return rank, local_rank, world, device




def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def all_sum(*values, device):
    """Sum numbers over all processes (every rank must call this). Returns floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def fail(message, master):
    """End this process with one line (printed by rank 0; the other ranks found the same error)."""
    sys.exit(f"error: {message}" if master else 1)


def agree(error, master):
    """Every rank ends if rank 0 found an error (for checks only rank 0 makes, such as the lock)."""
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        fail(error, master)



def amp_dtype(device, flag):
    """--dtype: auto = bf16 autocast on CUDA (no loss scaler needed, unlike the official fp16), fp32 on CPU."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[flag]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def warn_cpu(model):
    """One line before any work when a paper-sized model will run on a CPU: minutes per step, not a hang."""
    if model in swinv2.PAPER_SIZES and not torch.cuda.is_available():
        print0(f"warning: SwinV2-{model} on a CPU takes minutes per step (no GPU found); "
               f"the CPU sizes are nano and tiny")


def device_setup(device, dtype_flag, workers):
    """What the device decides, the same in every script: the autocast dtype and context, TF32 matmuls on
    GPUs, and data-loader workers (8 per GPU by default; none on a CPU, where the main process computes)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = amp_dtype(device, dtype_flag)
    return dtype, autocast(device, dtype), workers if workers is not None else 8 if device.type == "cuda" else 0




# -----------------------------------------------------------------------------
# --eval_only: a checkpoint into the model the flags built


def load_for_eval(path, model, encoder, name, master, classes=None):
    """--eval_only: load the run directory's checkpoint into the model the flags built, or end with one line.
    The position bias, its index and the shift masks are computed from the window and input sizes, not
    stored, so a checkpoint of another architecture would load without complaint and measure something
    else: it is refused, naming each field of the encoder that differs (SwinV2Config, drop path aside)."""
    if not os.path.exists(path):
        fail(f"--eval_only needs a checkpoint, and {path} does not exist", master)
    try:
        ckpt = load_checkpoint(path, need=("model", "step", "identity"))
    except ValueError as e:
        fail(e, master)
    theirs = (ckpt["identity"].get("model"), ckpt["identity"].get("data_classes"))
    if theirs[0] != name or (classes is not None and theirs[1] != classes):
        fail(f"{path} is a SwinV2-{theirs[0]}" + (f" with {theirs[1]} classes" if classes is not None else "")
             + f"; this is SwinV2-{name}" + (f" with {classes}" if classes is not None else "")
             + f": pass --model {theirs[0]}", master)
    plain = lambda v: list(v) if isinstance(v, (tuple, list)) else v
    saved = ckpt.get("model_config") or {}
    differ = [f"{k} {plain(saved[k])} vs {plain(v)}" for k, v in swinv2.model_config(encoder).items()
              if k in saved and k != "drop_path_rate" and plain(saved[k]) != plain(v)]
    if differ:
        fail(f"{path} was trained as another model ({', '.join(differ)} here): pass the flags of its run "
             f"(args.json)", master)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # a head of another size (e.g. --fpn_channels)
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        fail(f"{path} does not fit this model: {first} ...; pass the flags of its run (args.json)", master)
    return ckpt




# -----------------------------------------------------------------------------
# command line: argparse types that check each flag's own value


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first, and ours is long)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class TensorBoard(argparse.Action):
    """--tensorboard (see RunDir.events). TensorBoard is an optional dependency: a missing package is
    refused here, when the flag is parsed, before any work."""
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            import torch.utils.tensorboard  # noqa: F401 (imports the tensorboard package)
        except ImportError:
            parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
        setattr(namespace, self.dest, True)


def number(kind, lo, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite int or float in [lo, hi] (or open at either end), e.g.
    number(float, 0, lo_open=True) for > 0. A bad value is refused naming the flag, value and range."""
    want = (f"{'>' if lo_open else '>='} {lo:g}" if hi is None else
            f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"want {what} {want}, got {text!r}") from None
        too_low = v <= lo if lo_open else v < lo
        too_high = hi is not None and (v >= hi if hi_open else v > hi)
        if not math.isfinite(v) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v
    return parse


count, natural = number(int, 1), number(int, 0)  # > 0, >= 0
positive, non_negative = number(float, 0, lo_open=True), number(float, 0)


def model_name(text):
    """--model: a preset name; the paper's letters in either case (b = B), but G is not g: SwinV2-G (3B) is
    not a preset, the paper's giant is g."""
    names = {k.lower(): k for k in swinv2.PRESETS}
    if text in swinv2.PRESETS or text != "G" and text.lower() in names:
        return names[text.lower()]
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(swinv2.PRESETS)} "
                                     "(the paper's giant is g; SwinV2-G, 3B, is not a preset)")


def check_out_dir(path):
    """Refuse an --out_dir that is a file or cannot be created, before anything is written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir {path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir {path}: {parent} is not writable")


def batch_split(B, micro_batch, world_size):
    """(micro-batch, accumulation steps) for a global batch B: the micro-batch defaults to B / world size."""
    mb = micro_batch or B // world_size
    if mb == 0 or B % (mb * world_size):
        raise ValueError(f"--batch_size {B} is not divisible by --micro_batch {mb} x {world_size} processes")
    return mb, B // (mb * world_size)


if __name__ == "__main__":
    sys.exit("train.py is not a script: it holds the run that mim.py, finetune.py, detect.py and segment.py share; "
             "run one of those")
