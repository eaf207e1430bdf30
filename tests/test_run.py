"""Run integrity (mim.py and finetune.py share it): a kill at any moment and a rerun give the weights AND
the log of an uninterrupted run; non-finite steps never reach a checkpoint or a result; a run directory
refuses another run, a second process and a broken checkpoint in one line; every bad flag value is
refused before any work; Ctrl-C saves and says how to resume."""
import errno
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune
import mim
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # requirements-test.txt has it (CI)
TIMING = {"img_per_s", "data_wait"}  # measured, not computed: the only fields a resume may change
# 12 steps of 4 images; rows at 2, 4, val 5, 6, 8, 10, val 10, 12, val 12; checkpoints at 5, 10, 12
PRE = ["mim.py", "--model", "tiny", "--data", "synthetic:200", "--batch_size", "4", "--val_images", "4", "--workers", "0",
       "--iters", "12", "--log_every", "2", "--eval_every", "5", "--save_every", "5", "--drop_path", "0.1"]
# 24 images, batch 4: 6 steps per epoch, 2 epochs; rows every 4 steps, evaluation and checkpoint per epoch
FT = ["finetune.py", "--model", "tiny", "--data", "synthetic:24", "--batch_size", "4", "--epochs", "2", "--val_images", "8",
      "--workers", "0", "--log_every", "4", "--pretrained", "none"]

# Runs a script in a fresh process that SIGKILLs itself at a chosen moment (the n-th time it gets there).
KILLER = r"""
import json, os, signal, sys
import train
where, n, script, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
count = [0]

def reached():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

if where == "after_log_row":  # the n-th row is in log.jsonl
    log = train.RunDir.log
    def hooked(self, **row):
        log(self, **row)
        reached()
    train.RunDir.log = hooked
elif where == "mid_log_row":  # half of the n-th row is in log.jsonl
    log = train.RunDir.log
    def hooked(self, **row):
        if count[0] + 1 == n:
            open(self.file("log.jsonl"), "a").write(json.dumps(row)[:20])
        reached()
        log(self, **row)
    train.RunDir.log = hooked
elif where == "mid_checkpoint":  # the temp file is complete, the rename has not happened
    atomic_write = train.atomic_write
    def hooked(path, write):
        if path.endswith("ckpt.pt") and count[0] + 1 == n:
            with open(f"{path}.tmp{os.getpid()}", "wb") as f:
                write(f)
        if path.endswith("ckpt.pt"):
            reached()
        atomic_write(path, write)
    train.atomic_write = hooked
elif where == "in_evaluation":  # inside the n-th validation (after the checkpoint that comes before a final one)
    import mim
    estimate = mim.estimate_val_loss
    def hooked(*a):
        reached()
        return estimate(*a)
    mim.estimate_val_loss = hooked
elif where == "mid_step":  # after the backward pass of a step, before its update
    step = train.optimizer_step
    def hooked(*a):
        reached()
        return step(*a)
    train.optimizer_step = hooked
__import__(script[:-3]).main(argv)
"""


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(os.path.join(run_dir, "log.jsonl"))]


def run(argv, out):
    module = {"mim.py": mim, "finetune.py": finetune}[argv[0]]
    return module.main(argv[1:] + ["--out_dir", str(out)])


def killed(where, n, argv, out):
    """Run argv in a subprocess that kills itself with SIGKILL at the n-th `where`."""
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(n), argv[0], *argv[1:], "--out_dir", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def assert_same_run(a, b):
    """Same log rows (timing aside), same weights and optimizer state, bit for bit."""
    assert rows(a) == rows(b)
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, s in ca["optimizer"]["state"].items():
        for k in s:
            assert torch.equal(s[k], cb["optimizer"]["state"][i][k]), (i, k)
    assert json.load(open(os.path.join(a, "summary.json"))) == json.load(open(os.path.join(b, "summary.json")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs to compare with."""
    out = tmp_path_factory.mktemp("straight")
    run(PRE, out / "pre")
    run(FT, out / "ft")
    return out


@pytest.mark.parametrize("where,n", [
    ("after_log_row", 1),    # before the first checkpoint: starts over
    ("after_log_row", 5),    # the step-8 row is written, the last checkpoint is step 5 (the case)
    ("mid_log_row", 6),      # half of the step-10 row is in the file
    ("mid_checkpoint", 2),   # the step-10 checkpoint's temp file is written, not renamed
    ("mid_step", 7),         # inside step 7
    ("in_evaluation", 2),    # inside the step-10 validation, before that step's checkpoint
    ("in_evaluation", 3),    # inside the final validation: the step-12 checkpoint is already written
])
def test_pretraining_killed_anywhere_resumes_to_the_same_weights_and_log(where, n, straight, tmp_path):
    # the case also writes TensorBoard events (a flag that changes nothing the run computes): the
    # killed run's reach step 8, past its checkpoint, and the resumed run's must have each step once
    argv = PRE + (["--tensorboard"] if (where, n) == ("after_log_row", 5) and HAS_TENSORBOARD else [])
    killed(where, n, argv, tmp_path / "run")
    if where == "mid_checkpoint":
        assert any(".tmp" in f for f in os.listdir(tmp_path / "run"))
    if (where, n) == ("in_evaluation", 3):  # the trained weights were safe before the final evaluation began
        assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 12
        assert not (tmp_path / "run" / "summary.json").exists()
    if "--tensorboard" in argv:
        assert max(step for _, step, _ in events(tmp_path / "run")) == 8
    run(argv, tmp_path / "run")  # the same command again
    assert not any(".tmp" in f for f in os.listdir(tmp_path / "run"))  # a killed save's temp file is gone
    assert_same_run(straight / "pre", tmp_path / "run")
    if "--tensorboard" in argv:
        assert_events_follow_the_log(tmp_path / "run")


def test_finetuning_killed_between_a_log_row_and_its_checkpoint_resumes_exactly(straight, tmp_path):
    killed("after_log_row", 2, FT, tmp_path / "run")  # rows: 4, epoch 1 at 6, 8 <- killed; checkpoint at 6
    run(FT, tmp_path / "run")
    assert_same_run(straight / "ft", tmp_path / "run")


def test_ctrl_c_saves_this_step_says_how_to_resume_and_the_rerun_is_exact(straight, tmp_path, monkeypatch, capsys):
    step_fn = train.optimizer_step
    calls = []

    def ctrl_c_in_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step_fn(*a)

    monkeypatch.setattr(train, "optimizer_step", ctrl_c_in_step_3)
    with pytest.raises(SystemExit) as e:
        run(PRE, tmp_path / "run")
    assert e.value.code == 130
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    said = capsys.readouterr()
    said = said.out + said.err
    assert "Traceback" not in said and "KeyboardInterrupt" not in said
    assert "SIGINT: saving at the end of this step" in said and "run the same command again to resume" in said
    monkeypatch.undo()
    run(PRE, tmp_path / "run")
    assert_same_run(straight / "pre", tmp_path / "run")
    capsys.readouterr()
    run(PRE, tmp_path / "run")  # a finished run says so
    assert "this run is complete" in capsys.readouterr().out


def test_sigterm_before_an_evaluation_stops_without_it_exits_143_and_the_rerun_makes_it(straight, tmp_path, monkeypatch):
    """torchrun and SLURM allow ~30 s after SIGTERM: the run saves and stops at once, not after a validation."""
    step_fn, estimate, calls, evaluated = train.optimizer_step, mim.estimate_val_loss, [], []

    def sigterm_in_step_5(*a):  # step 5 ends at an evaluation boundary (--eval_every 5)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(*a)

    monkeypatch.setattr(train, "optimizer_step", sigterm_in_step_5)
    monkeypatch.setattr(mim, "estimate_val_loss", lambda *a: evaluated.append(1) or estimate(*a))
    with pytest.raises(SystemExit) as e:
        run(PRE, tmp_path / "run")
    assert e.value.code == 143 and evaluated == []  # not 0: `mim.py ... && finetune.py ...` must not go on
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 5
    assert not any("val_loss" in r for r in rows(tmp_path / "run"))
    monkeypatch.setattr(train, "optimizer_step", step_fn)
    run(PRE, tmp_path / "run")  # the step-5 validation comes first, then the rest: the same log as a straight run
    assert_same_run(straight / "pre", tmp_path / "run")


def test_a_diverging_run_stops_without_saving_the_streak_and_a_rerun_fails_the_same_way(tmp_path, capsys):
    argv = PRE + ["--lr", "1e30", "--save_every", "2"]
    for attempt in range(2):
        with pytest.raises(SystemExit) as e:
            run(argv, tmp_path / "run")
        assert re.search(r"error: 1\d non-finite steps in a row", str(e.value.code)) and "\n" not in str(e.value.code)
    # the first step is finite (it makes the weights huge), then every step is skipped: no checkpoint was
    # made inside the streak, and no NaN is written anywhere as a result
    assert not (tmp_path / "run" / "ckpt.pt").exists() and not (tmp_path / "run" / "summary.json").exists()
    text = open(tmp_path / "run" / "log.jsonl").read()
    assert "NaN" not in text and "Infinity" not in text
    logged = list(map(json.loads, text.splitlines()))
    assert [r["skipped_steps"] for r in logged if "train_loss" in r] == [1, 3, 5, 7, 9, 11]
    assert [r["val_loss"] for r in logged if "val_loss" in r] == [None, None]  # NaN is not a measurement
    assert "not saved, the last" in capsys.readouterr().err


def test_a_short_streak_is_skipped_counted_and_never_checkpointed(tmp_path, monkeypatch):
    forward = mim.SimMIM.forward
    calls = []

    def nan_in_steps_5_and_6(self, x, mask):  # the 5th and 6th steps (one forward per step)
        calls.append(1)
        loss = forward(self, x, mask)
        return loss * float("nan") if len(calls) in (5, 6) else loss

    monkeypatch.setattr(mim.SimMIM, "forward", nan_in_steps_5_and_6)
    saves = []
    save = train.RunDir.save
    monkeypatch.setattr(train.RunDir, "save", lambda self, m, o, step, **kw: (saves.append(step), save(self, m, o, step, **kw)))
    run(PRE + ["--save_every", "2", "--iters", "8"], tmp_path / "run")
    # the boundary after the 6th step is inside the streak: not saved; the last step saves before its evaluation and after
    assert saves == [2, 4, 8, 8]
    log = [r for r in rows(tmp_path / "run") if "train_loss" in r]
    assert [r["skipped_steps"] for r in log] == [0, 0, 2, 2] and None not in (log[1]["train_loss"], log[3]["train_loss"])
    assert log[2]["train_loss"] is None and log[2]["grad_norm"] is None  # its two steps were both skipped
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["skipped_steps"] == 2 and summary["train_loss"] is not None


IDENTITY = [["--data", "synthetic:300"], ["--frac", "0.5"], ["--subset_seed", "1"], ["--seed", "1"], ["--model", "nano"],
            ["--img_size", "128"], ["--mask_patch", "32"], ["--mask_ratio", "0.5"], ["--norm_target", "7"], ["--lr", "1e-3"],
            ["--warmup_lr", "0"], ["--warmup_iters", "2"], ["--batch_size", "8"], ["--iters", "13"], ["--drop_path", "0"],
            ["--weight_decay", "0"], ["--clip_grad", "1"], ["--val_images", "5"], ["--dtype", "bfloat16"], ["--window", "2"]]


def test_a_run_directory_refuses_another_run_and_accepts_free_knobs(straight, tmp_path, capsys):
    out = straight / "pre"
    for extra in IDENTITY:
        with pytest.raises(SystemExit) as e:
            run(PRE + extra, out)
        msg = str(e.value.code)
        assert msg.startswith(f"error: {out}/ckpt.pt belongs to another run") and "\n" not in msg, msg
        flag = "--data_train_images" if extra[0] == "--data" else extra[0]
        assert (flag.lstrip("-") if flag.startswith("--data_") else flag) + " " in msg and " there, " in msg, msg
    before = rows(out)
    for extra in [["--micro_batch", "2"], ["--log_every", "3"], ["--eval_every", "4"], ["--save_every", "7"], ["--grad_ckpt"]]:
        assert run(PRE + extra, out) == json.load(open(out / "summary.json"))["val_loss"]  # complete: nothing to redo
    assert rows(out) == before


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_second_process_is_refused_until_the_first_dies(workers, tmp_path):
    """With data-loader workers too: they are forked from the run's process, and the lock must not pass to them
    (a flock does: after a SIGKILL of the run, its orphaned workers held the folder for seconds)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, *PRE, "--iters", "100000", "--workers", workers, "--out_dir", str(out)], cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # wait until it holds the lock
            if (out / ".lock").exists() and open(out / ".lock").read():
                break
            time.sleep(0.1)
        with pytest.raises(SystemExit) as e:
            run(PRE + ["--iters", "100000"], out)
        assert str(e.value.code).startswith(f"error: {out} is in use by process {first.pid} on ")
    finally:
        first.kill()
        first.wait()
    lock = train.RunDir(str(out), True)  # SIGKILL released the lock at once: now it is ours
    assert lock.acquire() is None
    lock.release()
    assert open(out / ".lock").read() == ""  # let go: it names no process


def test_a_finished_run_leaves_a_lock_file_naming_no_process(straight):
    assert open(straight / "pre" / ".lock").read() == "" and open(straight / "ft" / ".lock").read() == ""


def test_a_file_system_without_locks_is_named_and_leaves_no_new_folder(tmp_path, monkeypatch):
    def no_locks(*a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(train.fcntl, "lockf", no_locks)
    msg = train.RunDir(str(tmp_path / "new"), True).acquire()
    assert "file system cannot lock files" in msg and "--out_dir" in msg and "\n" not in msg
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "not ours"])
def test_a_broken_checkpoint_is_named_left_alone_and_explained(kind, straight, tmp_path):
    good = open(straight / "pre" / "ckpt.pt", "rb").read()
    content = {"truncated": good[: len(good) // 2], "empty": b"", "garbage": os.urandom(5000), "not ours": None}[kind]
    os.makedirs(tmp_path / "run")
    path = tmp_path / "run" / "ckpt.pt"
    if content is None:
        torch.save({"model": {}, "step": 3}, path)
        content = open(path, "rb").read()
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run(PRE, tmp_path / "run")
    msg = str(e.value.code)
    assert msg.startswith(f"error: {path} is not") and f"mv {path} {path}.broken" in msg and "\n" not in msg, msg
    assert open(path, "rb").read() == content  # never modified or deleted
    with pytest.raises(SystemExit) as e:  # as a fine-tuning's --pretrained: the same, and no weights_only advice
        run(FT + ["--pretrained", str(path)], tmp_path / "ft")
    assert str(path) in str(e.value.code) and "weights_only=False" not in str(e.value.code)


BAD = {  # flag: values that must be refused (type, range, finiteness, or together with the other flags)
    "--model": ["X", "G"], "--img_size": ["-64", "0", "abc", "72"], "--window": ["0", "-1", "3"],
    "--drop_path": ["-0.1", "1", "nan"], "--mask_patch": ["0", "-16", "24"], "--mask_ratio": ["0", "1", "-0.5", "x"],
    "--norm_target": ["-1", "8"], "--frac": ["0", "1.5", "nan", "-1"], "--subset_seed": ["-1", "0.5"],
    "--val_images": ["0", "-5"], "--workers": ["-1"], "--iters": ["0", "-3", "1e3"], "--batch_size": ["0", "-8"],
    "--micro_batch": ["-1", "0", "3"], "--lr": ["-1", "0", "inf", "nan"], "--warmup_lr": ["-1", "inf"],
    "--warmup_iters": ["-1", "13"], "--weight_decay": ["-1", "nan"], "--clip_grad": ["-1", "inf"], "--seed": ["-1"],
    "--eval_every": ["0"], "--log_every": ["-2"], "--save_every": ["0"], "--dtype": ["float16"],
}
FT_BAD = {
    "--model": ["Q"], "--img_size": ["-64", "65"], "--window": ["0", "3"], "--drop_path": ["1.5"], "--val_images": ["-1"],
    "--mixup": ["-1", "nan"], "--cutmix": ["-0.5"], "--smoothing": ["1", "-0.1"], "--workers": ["-2"], "--epochs": ["0", "1.5"],
    "--warmup_epochs": ["-1", "3"], "--batch_size": ["0", "4000"], "--micro_batch": ["-4", "3"], "--lr": ["0", "-1e-3"],
    "--warmup_lr": ["-1"], "--min_lr": ["-1", "nan"], "--layer_decay": ["0", "1.5"], "--weight_decay": ["-0.05"],
    "--clip_grad": ["-1"], "--seed": ["-3"], "--log_every": ["0"], "--aug": ["heavy"], "--dtype": ["half"],
}


@pytest.mark.parametrize("argv,table", [(PRE, BAD), (FT, FT_BAD)], ids=["mim", "finetune"])
def test_every_bad_flag_value_is_refused_in_one_line_before_any_work(argv, table, tmp_path, capsys):
    tried = 0
    for flag, values in table.items():
        for value in values:
            out = tmp_path / f"{flag}{value}"
            with pytest.raises(SystemExit) as e:
                run(argv + [flag, value], out)
            err = capsys.readouterr().err.strip()
            said = err or str(e.value.code)
            assert e.value.code in (1, 2) or str(e.value.code).startswith("error:"), (flag, value, e.value.code)
            assert "Traceback" not in said and len(said.splitlines()) == 1, (flag, value, said)
            assert flag in said, (flag, value, said)
            assert not out.exists(), (flag, value)
            tried += 1
    assert tried == sum(map(len, table.values()))


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    for argv in (PRE, FT):
        with pytest.raises(SystemExit, match="--out_dir .* is a file"):
            run(argv, tmp_path / "f")


# What each script lets a resumed run change: how it runs and how it is measured, never what it computes. Every
# other flag is the run's identity. Written out here, so a flag made free by mistake (finetune's --smoothing, say)
# fails this test.
FREE_KNOBS = {
    "mim": {"compile", "data", "dist_timeout", "eval_every", "eval_only", "grad_ckpt", "log_every", "micro_batch", "out_dir",
            "save_every", "tensorboard", "val_data", "workers"},
    "finetune": {"allow_unfinished", "compile", "data", "dist_timeout", "eval_only", "grad_ckpt", "log_every", "micro_batch",
                 "out_dir", "tensorboard", "val_data", "val_images", "workers"},
    "detect": {"allow_unfinished", "data", "dist_timeout", "eval_every", "eval_only", "grad_ckpt", "log_every", "micro_batch",
               "out_dir", "save_every", "tensorboard", "val_images", "workers"},
    "segment": {"allow_unfinished", "compile", "data", "dist_timeout", "eval_every", "eval_only", "grad_ckpt", "log_every",
                "micro_batch", "out_dir", "save_every", "stride", "tensorboard", "val_images", "workers"},
}


@pytest.mark.parametrize("name", FREE_KNOBS)
def test_each_script_names_its_free_knobs_and_every_other_flag_is_its_identity(name):
    module = __import__(name)
    flags = {a.dest for a in module.get_parser()._actions if a.dest != "help"}
    assert flags & module.FREE == FREE_KNOBS[name]
    args = module.get_parser().parse_args(["--model", "tiny"] + ([] if name == "mim" else ["--pretrained", "none"]))
    identity = train.identity_of(args, module.resolve(args, 1), module.FREE)
    assert flags - FREE_KNOBS[name] <= set(identity) and not FREE_KNOBS[name] & set(identity)


def events(run_dir):
    """(tag, step, value) of every scalar in the folder's TensorBoard event files, in file order: read from
    the TFRecord bytes (length, CRC, Event proto, CRC) so that a duplicate cannot hide."""
    import glob
    import struct
    from tensorboard.compat.proto import event_pb2
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        raw, i = open(path, "rb").read(), 0
        while i < len(raw):
            n = struct.unpack("<Q", raw[i:i + 8])[0]
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def assert_events_follow_the_log(run_dir):
    """Each logged number is an event at its step, once, in the log's order (--tensorboard)."""
    logged = [(k, row["step"], v) for row in map(json.loads, open(run_dir / "log.jsonl"))
              for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    seen = events(run_dir)
    assert [(k, s) for k, s, _ in seen] == [(k, s) for k, s, _ in logged]
    assert len(set((k, s) for k, s, _ in seen)) == len(seen) and {"train_loss", "val_loss", "lr"} <= {k for k, _, _ in seen}
    assert all(abs(a[2] - b[2]) <= 1e-6 * max(1, abs(b[2])) for a, b in zip(seen, logged))


def test_tensorboard_without_its_package_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package gives
    for module in (mim, finetune):
        with pytest.raises(SystemExit):
            module.get_parser().parse_args(["--tensorboard"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--tensorboard needs the tensorboard package: pip install tensorboard" in err
