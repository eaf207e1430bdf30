"""study.py: FLOPs against FlopCounterMode, plan by hand, the grids, sbatch files (bash -n, torchrun's and the
scripts' parsers, the signal/requeue logic against stand-ins for srun and scontrol), the local executor end to
end, status of finished, running, killed, missing, non-finite and overfitting runs, bad input."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.run import get_args_parser as torchrun_parser
from torch.utils.flop_counter import FlopCounterMode

import analyze
import bench
import detect
import finetune
import mim
import segment
import study
import swinv2
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pretrain_args=--batch_size 8 --val_images 8 --eval_every 4 --log_every 2 --save_every 4",
        "--finetune_args=--epochs 1 --batch_size 16 --val_images 16 --data synthetic:32"]


def grid_file(tmp_path, text, name="grid.csv"):
    path = tmp_path / name
    path.write_text("model,data,frac,iters,tasks\n" + text)
    return str(path)


def error_of(argv):
    """The one-line message main() exits with."""
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    return str(e.value.code)


# ----------------------------------------------------------------------------- cost


def test_copied_tables_match_the_scripts():
    for name, (C, depths, head_dim, img, window) in study.SIZES.items():
        cfg = swinv2.SwinV2Config(**swinv2.PRESETS[name])
        assert (cfg.embed_dim, cfg.depths, cfg.head_dim, cfg.img_size, cfg.window_size) == (C, depths, head_dim, img, window)
    assert set(study.PAPER_SIZES) == set(swinv2.PAPER_SIZES) and study.MAX_NON_FINITE == train.MAX_NON_FINITE
    for script, module in (("mim.py", mim), ("finetune.py", finetune), ("detect.py", detect), ("segment.py", segment)):
        for kind, (unit, length, batch, size_flag, img, window) in study.SCHEDULES[script].items():
            recipe = module.RECIPES[kind]
            assert (recipe[unit[2:]], recipe["batch_size"]) == (length, batch)
            if script != "mim.py":  # pre-training takes its input size and window from the preset
                assert (recipe[size_flag[2:]], recipe["window"]) == (img, window)


def test_flops_per_image_equal_flop_counter_mode():
    """train_flops against torch's FlopCounterMode: bench.py's own function on nano (batch 2, so the position-bias
    MLP's share counts), and SimMIM-B, a fine-tuning classifier and a dense-task encoder on the meta device
    (shapes only, no memory)."""
    model, _ = bench.simmim_parts(swinv2.create("nano", drop_path_rate=0.1), torch.device("cpu"))
    x, mask = bench.simmim_batch(model.encoder.cfg, 2, torch.device("cpu"))
    cpu = train.autocast(torch.device("cpu"), torch.float32)
    assert bench.flops_per_image(model, x, mask, cpu) == study.train_flops("nano", 64, 4, "simmim", batch=2)

    def counted(model, *inputs):
        with FlopCounterMode(display=False) as counter:
            out = model(*inputs)
            (out if out.dim() == 0 else out.float().sum()).backward()
        return counter.get_total_flops() / inputs[0].shape[0]
    with torch.device("meta"):
        simmim_b = mim.SimMIM(swinv2.create("B", drop_path_rate=0.1), 47)
        classifier = swinv2.create("S", img_size=224, window_size=14, num_classes=8142)  # windows 14,14,14,7
        dense = swinv2.create("nano", img_size=128, window_size=8)
        x192, mask, x224, x128 = torch.randn(4, 3, 192, 192), torch.zeros(4, 48, 48), torch.randn(4, 3, 224, 224), torch.randn(4, 3, 128, 128)
    assert counted(simmim_b, x192, mask) == study.train_flops("B", 192, 12, "simmim", batch=4)  # 71.3 GFLOP
    assert counted(classifier, x224) == study.train_flops("S", 224, 14, 8142, batch=4)
    assert counted(dense, x128) == study.train_flops("nano", 128, 8, 0, batch=4)


def test_plan_gpu_hours_of_one_cell_by_hand(tmp_path, capsys):
    """B on 10 % of IN-1K for 125K iterations: 125,000 x 2048 images over round(0.1 x 1,281,167) = 128,117,
    each costing what FlopCounterMode counts for SimMIM-B (meta device; batch 1024, so the per-forward MLP is
    negligible as the plan assumes), at 25 % of 989 TFLOPS."""
    with torch.device("meta"):
        model = mim.SimMIM(swinv2.create("B"), 47)
        x, mask = torch.randn(1024, 3, 192, 192), torch.zeros(1024, 48, 48)
    with FlopCounterMode(display=False) as counter:
        model(x, mask).backward()
    flops = counter.get_total_flops() / 1024
    images = 125_000 * 2048
    by_hand = images * flops / (0.25 * 989e12) / 3600  # about 25.6 GPU-hours
    opt = study.get_parser().parse_args(["plan", "--grid", grid_file(tmp_path, "B,IN-1K,0.1,125000,\n"), "--mfu", "0.25"])
    [(job, cost, hours, source)] = study.plan(study.build_jobs(study.file_cells(opt.grid), opt, "study/x", (0,), False), opt)
    assert source == "FLOPs" and cost["images"] == images and hours == pytest.approx(by_hand, rel=1e-5)
    assert cost["epochs"] == pytest.approx(images / 128_117)
    assert f"{by_hand:.1f}" in capsys.readouterr().out


def test_plan_takes_measured_rates_from_a_bench_report(tmp_path):
    """A report in bench.py's format: eager and compiled SimMIM rows, and the fine-tuning row (B, 224 px, window
    14) that serves in1k and inat18; COCO has no measurement and keeps the FLOPs estimate."""
    report = {"env": {"device": "NVIDIA H100", "peak_tflops": 989}, "size B": {"img_size": 192, "gflop_per_img": 71.3,
              "eager": {"batch": 128, "img_s": 2000.0}}, "compiled B": {"batch": 128, "img_s": 3200.0},
              "size L": {"error": "OutOfMemoryError"}, "finetune": {"model": "B", "img_size": 224, "window": 14, "img_s": 1000.0}}
    (tmp_path / "gpu.json").write_text(json.dumps(report))
    grid = grid_file(tmp_path, "B,IN-1K,1,250000,in1k inat18 coco\nL,IN-1K,1,125000,\n")
    for extra, rate in (([], 2000.0), (["--pretrain_args=--compile"], 3200.0)):
        opt = study.get_parser().parse_args(["plan", "--grid", grid, "--bench", str(tmp_path / "gpu.json")] + extra)
        rows = {job["name"]: (cost, hours, source) for job, cost, hours, source in
                study.plan(study.build_jobs(study.file_cells(grid), opt, "s", (0,), False), opt)}
        assert rows["B_in1k_frac1_250k"][1:] == (pytest.approx(250_000 * 2048 / rate / 3600), "measured")
        ft = 100 * (1_281_167 // 2048) * 2048
        assert rows["B_in1k_frac1_250k.in1k_s0"][1:] == (pytest.approx(ft / 1000 / 3600), "measured")
        assert rows["B_in1k_frac1_250k.inat18_s0"][2] == "measured" and rows["B_in1k_frac1_250k.coco_s0"][2] == "FLOPs"
        assert rows["L_in1k_frac1_125k"][2] == "FLOPs"  # the report's L row failed


def test_paper_and_miniature_grids():
    cells, seeds, scratch = study.read_grid("paper")
    assert len(cells) == 63 and seeds == (0,) and not scratch
    opt = study.get_parser().parse_args(["plan"])
    jobs = study.build_jobs(cells, opt, "study/paper", seeds, scratch)
    tasks = [job["task"] for job in jobs]
    assert tasks.count(None) == 63 and tasks.count("in1k") == 63
    assert tasks.count("coco") == tasks.count("ade20k") == tasks.count("inat18") == 12 + 15 + 15  # S, B, L cells
    assert len({job["name"] for job in jobs}) == len(jobs)
    # the miniature grid is miniature.sh's: its loops, its seeds, its baselines from scratch
    text = open(os.path.join(ROOT, "miniature.sh")).read()
    loop = lambda var: re.search(rf"for {var} in ([^;]+);", text).group(1).split()
    cells, seeds, scratch = study.read_grid("miniature")
    assert [(c["model"], f"{c['frac']:g}", str(c["iters"])) for c in cells] == \
        [(m, f, i) for m in loop("model") for f in loop("frac") for i in loop("iters")]
    assert seeds == tuple(int(s) for s in re.search(r"SEEDS:-([\d ]+)", text).group(1).split()) and scratch


# ----------------------------------------------------------------------------- SLURM


@pytest.fixture
def slurm_study(tmp_path):
    """A 2-cell grid, one fine-tune, written as SLURM jobs for 2 nodes of 4 GPUs."""
    grid = grid_file(tmp_path, "nano,synthetic,1,40,synthetic\nB,IN-1K,0.5,125000,\n")
    out = tmp_path / "study"
    assert study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--nodes", "2", "--gpus_per_node", "4",
                       "--partition", "gpu", "--sbatch=--mem=0", "--time", "2:00:00", "--pretrain_args=--workers 10",
                       "--finetune_args=--epochs 1"]) == 0
    return out


def test_sbatch_files_pass_bash_n_and_parse_with_torchrun_and_the_scripts(slurm_study):
    files = sorted((slurm_study / "jobs").iterdir())
    assert [f.name for f in files] == ["B_in1k_frac0.5_125k.sbatch", "nano_synthetic_frac1_40.sbatch", "nano_synthetic_frac1_40.synthetic_s0.sbatch"]
    for f in files + [slurm_study / "submit.sh"]:
        assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0, f
    for f in files:
        text = f.read_text()
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --partition=gpu", "#SBATCH --mem=0", "#SBATCH --time=2:00:00"):
            assert line in text.splitlines(), (f.name, line)
        [srun] = [line for line in text.splitlines() if line.startswith("srun ")]
        for var, value in (("$SLURM_NNODES", "2"), ("$HEAD:$PORT", "node1:20123"), ("$SLURM_JOB_ID", "123"), ("$SLURM_CPUS_PER_TASK", "32")):
            srun = srun.replace(var, value)
        words = shlex.split(srun.rstrip("& "))
        assert words[:2] == ["srun", "--cpus-per-task=32"] and words[2] == "torchrun"
        args = torchrun_parser().parse_args(words[3:])
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("2", "4", "c10d", "node1:20123")
        script = {"mim.py": mim, "finetune.py": finetune}[args.training_script]
        flags = script.get_parser().parse_args(args.training_script_args)
        assert os.path.isabs(flags.out_dir) and f"RUN={flags.out_dir}" in text
        if script is mim and flags.model == "B":  # 8 processes: 128 images each, the README's first try for B
            assert flags.micro_batch == 128 and flags.batch_size is None
    submit = (slurm_study / "submit.sh").read_text()
    assert "--dependency=afterok:${id[nano_synthetic_frac1_40]}" in submit and submit.count("--dependency=afterok") == 1
    assert "#SBATCH --kill-on-invalid-dep=yes" in (slurm_study / "jobs" / "nano_synthetic_frac1_40.synthetic_s0.sbatch").read_text()
    manifest = json.loads((slurm_study / "grid.json").read_text())
    assert [j["after"] for j in manifest["jobs"]] == [None, "nano_synthetic_frac1_40", None]


STAND_INS = {  # srun, torchrun, scontrol and scancel as far as the job file uses them
    "srun": 'shift; exec "$@"\n',
    "scontrol": 'case "$1" in show) echo node1 ;; requeue) echo "requeue $2" >> "$STUB/calls" ;; esac\n',
    "scancel": 'echo "scancel $*" >> "$STUB/calls"; kill -TERM "$(cat "$STUB/step.pid")"\n',
    # a training run: logs step 10, saves (logs step 20) on SIGTERM; HUNG: logs nothing; FINISH: completes
    "torchrun": 'echo $$ > "$STUB/step.pid"; while [ "$1" != --out_dir ]; do shift; done; RUN=$2; mkdir -p "$RUN"\n'
                '[ -n "$HUNG" ] || echo \'{"step": 10, "train_loss": 1.0}\' >> "$RUN/log.jsonl"\n'
                'trap \'[ -n "$HUNG" ] || echo "{\\"step\\": 20}" >> "$RUN/log.jsonl"; exit 0\' TERM\n'
                '[ -n "$FINISH" ] && { echo "{}" > "$RUN/summary.json"; exit 0; }\n'
                'while :; do sleep 0.05; done\n',
}


@pytest.mark.parametrize("case, calls", [
    ("time limit", ["scancel --signal=TERM 123", "requeue 123"]),  # USR1: save, then back in the queue
    ("no progress", ["scancel --signal=TERM 123"]),                # USR1 but the log did not move: no loop
    ("cancelled", []),                                             # TERM (scancel): stop, no requeue
    ("complete", []),                                              # summary.json: the only success
])
def test_sbatch_saves_and_requeues_before_the_time_limit(slurm_study, tmp_path, case, calls):
    """The generated job file, run by bash with stand-ins for the SLURM commands and the training."""
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    for name, body in STAND_INS.items():
        (stub / "bin" / name).write_text("#!/bin/bash\n" + body)
        (stub / "bin" / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stub / 'bin'}:{os.environ['PATH']}", STUB=str(stub), SLURM_JOB_ID="123",
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="32",
               HUNG="1" if case == "no progress" else "", FINISH="1" if case == "complete" else "")
    job = subprocess.Popen(["bash", str(slurm_study / "jobs" / "nano_synthetic_frac1_40.sbatch")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if case != "complete":
        deadline = time.time() + 20
        while not (stub / "step.pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        if case == "cancelled":  # SLURM signals the batch shell and the job step alike
            os.kill(int((stub / "step.pid").read_text()), signal.SIGTERM)
            job.send_signal(signal.SIGTERM)
        else:
            job.send_signal(signal.SIGUSR1)
    assert (job.wait(timeout=30) == 0) == (case == "complete"), job.stdout.read()  # not 0 without summary.json
    assert ((stub / "calls").read_text().splitlines() if (stub / "calls").exists() else []) == calls


# ----------------------------------------------------------------------------- local executor and status


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    """The local executor on a 2-cell nano grid with one fine-tune, end to end (seconds per run)."""
    tmp = tmp_path_factory.mktemp("local")
    grid = grid_file(tmp, "nano,synthetic,1,4,synthetic\nnano,synthetic,0.5,4,\n")
    rc = study.main(["launch", "--grid", grid, "--executor", "local", "--out", str(tmp / "study")] + TINY)
    return tmp / "study", grid, rc


def test_local_executor_runs_the_grid_end_to_end(local_study, capfd):
    out, grid, rc = local_study
    assert rc == 0
    runs = out / "runs"
    for run in ("nano_synthetic_frac1_4", "nano_synthetic_frac1_4/ft_synthetic_s0", "nano_synthetic_frac0.5_4"):
        assert (runs / run / "summary.json").exists(), run
    summary = json.loads((runs / "nano_synthetic_frac1_4/ft_synthetic_s0/summary.json").read_text())
    assert summary["kind"] == "finetune" and summary["pretrained"]["run_dir"].endswith("nano_synthetic_frac1_4")
    capfd.readouterr()
    assert study.main(["launch", "--grid", grid, "--executor", "local", "--out", str(out)] + TINY) == 0  # all complete: nothing runs
    assert capfd.readouterr().out.count("complete: ") == 3
    study.main(["status", str(out)])
    rows = capfd.readouterr().out.splitlines()[1:]
    assert len(rows) == 3 and all(" finished " in row for row in rows) and sum(" 4/4 " in row for row in rows) == 2, rows


def status_rows(capsys, *paths):
    study.main(["status", *map(str, paths)])
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}


def test_status_of_finished_running_killed_and_missing_runs(local_study, tmp_path, capsys):
    """One study folder: a finished run (copied from the local grid), a run that is running and then killed with
    SIGKILL after its first checkpoints, and a run never started."""
    grid = grid_file(tmp_path, "nano,synthetic,1,4,\nnano,synthetic,0.25,2000,\nnano,synthetic,0.1,4,\n")
    out = tmp_path / "study"
    study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out),
                "--pretrain_args=--batch_size 8 --val_images 8 --eval_every 1000 --log_every 1 --save_every 1"])
    shutil.copytree(local_study[0] / "runs" / "nano_synthetic_frac1_4", out / "runs" / "nano_synthetic_frac1_4")
    [command] = [j["command"] for j in json.loads((out / "grid.json").read_text())["jobs"] if "0.25" in j["name"]]
    run = out / "runs" / "nano_synthetic_frac0.25_2k"
    child = subprocess.Popen([sys.executable] + shlex.split(command), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((run / "ckpt.pt").exists() and (run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
            assert time.time() < deadline and child.poll() is None, "the run did not start"
            time.sleep(0.2)
        rows = status_rows(capsys, out)
        assert re.search(r" running +\d+/2000 +\d+ +\d+h\d\d ", rows["nano_synthetic_frac0.25_2k"]), rows
    finally:
        child.kill()
        child.wait()
    rows = status_rows(capsys, out)
    assert " finished " in rows["nano_synthetic_frac1_4"] and "val_loss" in rows["nano_synthetic_frac1_4"]
    step = study.log_rows(str(run))[-1]["step"]  # the last whole row (a kill may cut one in half)
    assert f" stopped at step {step} " in rows["nano_synthetic_frac0.25_2k"], rows
    assert " missing " in rows["nano_synthetic_frac0.1_4"]
    # the same runs named by a glob of run directories (a missing one cannot match)
    rows = status_rows(capsys, f"{out}/runs/nano_*")
    assert len(rows) == 2 and " finished " in rows[f"{out}/runs/nano_synthetic_frac1_4"]


def write_run(path, rows, summary=None, args=None):
    path.mkdir(parents=True)
    (path / "args.json").write_text(json.dumps(args or dict(iters=None, world_size=2, identity=dict(iters=100, batch_size=64))))
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))


def train_row(step, skipped=0, loss=0.5, img_s=64.0):
    return dict(step=step, epoch=step / 10, lr=1e-3, train_loss=loss, grad_norm=1.0, img_per_s=img_s, data_wait=0.0,
                skipped_steps=skipped, bad_images=0, bad_files=0)


def test_status_reads_non_finite_stops_overfitting_gpu_hours_and_the_lock(tmp_path, capsys):
    # 10 non-finite steps in a row (4 at the end of one row, then 6 of 6): mim.py stopped the run
    write_run(tmp_path / "nan", [train_row(10), train_row(20, 4), train_row(26, 10, loss=None)])
    # non-finite steps that were not in a row: stopped by something else
    write_run(tmp_path / "killed", [train_row(10, 3), train_row(20, 6), train_row(30, 9)])
    # validation loss up at two evaluations in a row, in an older log (no flag) ...
    val = lambda s, v, **kw: dict(step=s, val_loss=v, **kw)
    write_run(tmp_path / "over", [train_row(10), val(10, 0.50), train_row(20), val(20, 0.48), val(30, 0.49), val(40, 0.51),
                                  val(50, 0.47), train_row(100)], summary={})
    # ... and flagged by mim.py's live warning
    write_run(tmp_path / "flagged", [train_row(10), val(10, 0.5), val(20, 0.49, overfitting=True)])
    rows = status_rows(capsys, tmp_path / "nan", tmp_path / "killed", tmp_path / "over", tmp_path / "flagged")
    assert " stopped: non-finite losses " in rows[str(tmp_path / "nan")]
    assert " stopped at step 30 " in rows[str(tmp_path / "killed")]
    assert " finished, overfitting at step 40 " in rows[str(tmp_path / "over")] and " val_loss 0.47 " in rows[str(tmp_path / "over")]
    assert " stopped at step 10, overfitting at step 20 " in rows[str(tmp_path / "flagged")]
    # GPU-hours: each row's steps x 64 images / 64 img/s, on 2 processes: 100 steps -> 100 s x 2 GPUs
    assert study.describe(str(tmp_path / "over"))["gpu_h"] == pytest.approx(200 / 3600)
    # a live run holds .lock (lockf) and names itself in it: running, with images/s and the time left. The holder is
    # another process, as in life (a POSIX lock is let go when its own process closes any descriptor of the file)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, socket, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); f.write(f'process {os.getpid()} on {socket.gethostname()}'); "
                               "f.flush(); print('held', flush=True); time.sleep(120)", str(tmp_path / "killed" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = study.describe(str(tmp_path / "killed"))
        assert r["state"] == "running" and r["eta_s"] == pytest.approx((100 - 30) * 64 / 64.0)
    finally:
        holder.kill()
        holder.wait()
    assert study.describe(str(tmp_path / "killed"))["state"] == "stopped at step 30"  # released: no longer running


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_one_line_naming_the_flag_or_file(tmp_path):
    bad = lambda text: grid_file(tmp_path, text, f"g{len(os.listdir(tmp_path))}.csv")
    cases = [
        (["plan", "--grid", "papers"], "--grid 'papers': use 'paper', 'miniature' or a CSV file"),
        (["plan", "--grid", bad("Q,IN-1K,0.1,1000,\n")], "row 1 (Q,IN-1K,0.1,1000,): model 'Q': choose from S, B, L, H, g, tiny, nano"),
        (["plan", "--grid", bad("B,IN-1K,0,1000,\n")], "row 1 (B,IN-1K,0,1000,): frac 0 must be in (0, 1]"),
        (["plan", "--grid", bad("B,IN-1K,0.1,1000,\nB,IN-1K,0.1,x,\n")], "row 2 (B,IN-1K,0.1,x,): invalid literal for int()"),
        (["plan", "--grid", bad("B,IN-1K,0.1,1000,imagenet\n")], "task 'imagenet': choose from in1k, inat18, coco, ade20k, synthetic"),
        (["plan", "--grid", bad("B,IN-1K,0.1\n")], "wrong number of fields"),
        (["plan", "--grid", bad("B,IN-1K,0.1,1000,\nB,IN-1K,0.1,1000,\n")], "two rows make the same run B_in1k_frac0.1_1k"),
        (["plan", "--tasks", "in1k,seg"], "argument --tasks: 'seg' is no task"),
        (["plan", "--mfu", "0"], "argument --mfu: '0' must be > 0"),
        (["plan", "--mfu", "1.5"], "argument --mfu: '1.5' must be in (0, 1]"),
        (["plan", "--bench", str(tmp_path / "none.json")], "--bench"),
        (["launch", "--executor", "slurm", "--time", "soon"], "argument --time: 'soon': want SLURM's"),
        (["launch", "--executor", "slurm", "--nodes", "0"], "argument --nodes: '0' must be > 0"),
        (["launch", "--executor", "pbs"], "argument --executor: invalid choice: 'pbs'"),
        (["launch", "--executor", "local", "--nodes", "2"], "--executor local runs on this machine: --nodes 1"),
        (["launch", "--executor", "slurm", "--gpus_per_node", "3", "--dry_run"], "3 processes do not divide the global batch 2048"),
    ]
    bad_file = grid_file(tmp_path, "", "header.csv")
    (tmp_path / "header.csv").write_text("size,data\nB,IN-1K\n")
    cases.append((["plan", "--grid", bad_file], f"--grid {bad_file}: want a CSV with the header model,data,frac,iters"))
    for argv, message in cases:
        text = error_of(argv)
        assert text.startswith("error: ") and message in text and "\n" not in text, (argv, text)


# ----------------------------------------------------------------------------- which runs to fine-tune (issue 34)


def finished_pretraining(run, model, frac, val, iters=40, finished=True):
    """A mim.py run directory as status and analyze.py read it: args.json, log.jsonl, and summary.json unless
    it is still running (then its log stops at half its steps)."""
    step = iters if finished else iters // 2
    write_run(run, [train_row(step), dict(step=step, val_loss=val)],
              dict(kind="pretrain", model=model, data="synthetic", frac=frac, iters=iters, step=iters, train_loss=0.5,
                   val_loss=val) if finished else None,
              dict(model=model, data="synthetic", frac=frac, iters=iters, identity=dict(iters=iters, batch_size=64)))


def finished_finetune(run, model, top1, iters=40, task="synthetic"):
    """finetune.py's summary.json in the grid's place for it, naming the final step of its pre-training."""
    pretrained = dict(path=f"{run}/ckpt.pt", run_dir=str(run), model=model, step=iters)
    write_run(run / f"ft_{task}_s0", [], dict(kind="finetune", task=task, model=model, best_top1=top1, best_top5=90.0,
                                             pretrained=pretrained), dict(task=task, pretrained=pretrained))


@pytest.fixture
def half_done_study(tmp_path):
    """A grid of nano and tiny x 6 fractions, launched for its pre-trainings only (--tasks none). Per model, two
    runs are fine-tuned; of the others three are finished, one still runs, and top-1 = intercept - 40 x val loss
    (+-0.1, so that the fit has a residual), so the lowest validation losses predict the highest top-1."""
    fracs = (0.01, 0.05, 0.1, 0.2, 0.5, 1)
    grid = grid_file(tmp_path, "".join(f"{m},synthetic,{f},40,synthetic\n" for m in ("nano", "tiny") for f in fracs))
    out = tmp_path / "study"
    assert study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--tasks", "none"]) == 0
    vals = dict(zip(fracs, (0.60, 0.50, 0.55, 0.45, 0.52, 0.40)))  # 0.5 and 1 are fine-tuned; 1 % still runs
    for model, intercept in (("nano", 40.0), ("tiny", 50.0)):
        for i, f in enumerate(fracs):
            run = out / "runs" / f"{model}_synthetic_frac{f:g}_40"
            finished_pretraining(run, model, f, vals[f], finished=f != 0.01)
            if f in (0.5, 1):
                finished_finetune(run, model, intercept - 40 * vals[f] + (0.1 if (f == 1) == (model == "nano") else -0.1))
    return grid, out


def test_status_predicts_top1_of_finished_runs_not_fine_tuned_yet(half_done_study, capsys):
    grid, out = half_done_study
    rows = status_rows(capsys, out)
    analyzed = {r["run_dir"]: r for r in analyze.load_runs([str(out / "runs" / "*"), str(out / "runs" / "*" / "ft_*")])}
    fit = [r for r in analyzed.values() if r.get("synthetic_top1") is not None]
    assert len(fit) == 4
    for model in ("nano", "tiny"):
        for f in (0.05, 0.1, 0.2):
            name = f"{model}_synthetic_frac{f:g}_40"
            [(_, value, half)], _ = analyze.predict_runs(fit, [analyzed[str(out / "runs" / name)]], "synthetic_top1")
            assert rows[name].endswith(f"  {value:.2f} [{value - half:.2f}, {value + half:.2f}]"), rows[name]
        for f in (0.01, 0.5, 1):  # still running, or fine-tuned already: nothing to predict
            assert "[" not in rows[f"{model}_synthetic_frac{f:g}_40"]
    study.main(["status", str(out)])
    assert "synthetic_top1 predicted (90 %)" in capsys.readouterr().out.splitlines()[0]


def test_finetune_top_launches_the_k_best_predicted_per_model(half_done_study, capsys):
    grid, out = half_done_study
    before = sorted(p.name for p in (out / "jobs").iterdir())
    assert study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--finetune_top", "2"]) == 0
    printed = capsys.readouterr().out
    # the two lowest val losses among the finished runs not fine-tuned (0.45, 0.50 of 0.45, 0.50, 0.55; the
    # running 1 % run has 0.60 and no summary), for each model
    chosen = [f"{m}_synthetic_frac{f}_40.synthetic_s0" for m in ("nano", "tiny") for f in ("0.2", "0.05")]
    new = sorted(set(p.name for p in (out / "jobs").iterdir()) - set(before))
    assert new == sorted(f"{name}.sbatch" for name in chosen)
    submit = (out / "submit.sh").read_text()
    assert sorted(re.findall(r" (\S+)\.sbatch\)", submit)) == sorted(chosen)  # the only jobs it submits
    assert "nano_synthetic_frac0.1_40  " in printed and "not now" in printed
    jobs = {j["name"]: j for j in json.loads((out / "grid.json").read_text())["jobs"]}
    done = [f"{m}_synthetic_frac{f}_40.synthetic_s0" for m in ("nano", "tiny") for f in ("0.5", "1")]
    assert sum(j["task"] is None for j in jobs.values()) == 12  # status still shows every pre-training...
    assert sorted(n for n, j in jobs.items() if j["task"]) == sorted(chosen + done)  # ...and the fine-tunes so far
    # again: the chosen have started (their run folders exist) and are skipped; the next best is taken
    for name in chosen:
        (out / "runs" / name.replace(".synthetic_s0", "") / "ft_synthetic_s0").mkdir()
    assert study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--finetune_top", "1"]) == 0
    assert sorted(re.findall(r" (\S+)\.sbatch\)", (out / "submit.sh").read_text())) == \
        [f"{m}_synthetic_frac0.1_40.synthetic_s0" for m in ("nano", "tiny")]


def test_finetune_top_refuses_without_fine_tuned_runs_and_predicts_from_the_paper(tmp_path, capsys):
    grid = grid_file(tmp_path, "B,IN-1K,0.1,125000,in1k\nB,IN-1K,0.2,125000,in1k\nB,IN-1K,0.5,125000,in1k\n")
    out = tmp_path / "study"
    for frac, val in ((0.1, 0.4822), (0.2, 0.4703), (0.5, 0.4683)):  # the paper's B at 125K: 83.33, 83.86, 84.04
        finished_pretraining(out / "runs" / f"B_in1k_frac{frac:g}_125k", "B", frac, val, iters=125000)
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    text = error_of(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--finetune_top", "1"])
    assert text.startswith("error: --finetune_top: no fine-tuned runs in") and "--predict_from paper" in text
    assert "\n" not in text and sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing written
    assert "argument --finetune_top: '0' must be > 0" in error_of(["launch", "--executor", "slurm", "--finetune_top", "0"])
    # the authors' 63 runs as the fit: B's lowest validation loss is fine-tuned first
    assert study.main(["launch", "--grid", grid, "--executor", "slurm", "--out", str(out), "--finetune_top", "1",
                       "--predict_from", "paper"]) == 0
    assert re.findall(r" (\S+)\.sbatch\)", (out / "submit.sh").read_text()) == ["B_in1k_frac0.5_125k.in1k_s0"]
    paper = analyze.load_csv(analyze.PAPER_CSV, source="paper")
    [(_, value, half)], _ = analyze.predict_runs(paper, [dict(model="B", iters=125000, val_loss=0.4703)], "in1k_top1")
    assert status_rows(capsys, out, "--predict_from", "paper")["B_in1k_frac0.2_125k"].endswith(
        f"  {value:.2f} [{value - half:.2f}, {value + half:.2f}]")
