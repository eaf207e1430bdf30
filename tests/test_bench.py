"""bench.py: the GPU report's functions run on a CPU at tiny sizes (so the GPU run is a measurement, not
a round of debugging), its micro-batch search and time budget, the FLOP count behind MFU, and the small
modes' edges (no timm, temporary JPEGs). Timings are never asserted."""
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import types

import pytest
import torch

import bench
import mim
import swinv2

TINY_PLAN = dict(bench.GPU_PLAN, micro=4, cap=8, sizes=("tiny", "nano"), ckpt=("nano",), dense=("tiny",), compile=("tiny", "nano"),
                 sdpa=("tiny", 2), numerics=("tiny", 2), tiny=(3, 2), finetune=("tiny", 64, 4),
                 data=dict(jpeg_size="64x48", images=2), timing=dict(warmup=1, seconds=0, min_steps=1), search_s=1e6,
                 compile_backend=None)  # torch.compile itself: test_compiled_step_equals_eager


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine its spin-waits cost CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_report_on_cpu_at_tiny_size(tmp_path, monkeypatch, one_thread):
    """Every phase of the report, with an out-of-memory error simulated above micro-batch 2 (raised in
    the SimMIM loss, as a real one would be mid-step), so the halving, the search and the recovery run too."""
    norm_targets = mim.norm_targets

    def small_memory(x, k):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return norm_targets(x, k)
    monkeypatch.setattr(mim, "norm_targets", small_memory)
    path = str(tmp_path / "report.json")
    R = bench.gpu_report(torch.device("cpu"), TINY_PLAN, budget=1e6, json_path=path)

    assert json.load(open(path))["phases"] == R["phases"]
    md = open(str(tmp_path / "report.md")).read()
    for label in ("tiny SimMIM, 64 px, eager", "tiny SimMIM, 64 px, torch.compile", "nano SimMIM, 64 px, eager, grad_ckpt",
                  "nano SimMIM, 64 px, torch.compile"):
        assert f"| {label} | 2 |" in md, label  # halved from 4
    assert "| tiny fine-tuning, 64 px, window 4, eager | 4 |" in md  # no loss, no simulated shortage
    assert "| tiny Mask R-CNN (bf16 backbone), 128 px, window 4 | 2 |" in md and "| tiny UPerNet, 64 px, window 4 | 2 |" in md
    assert "error" not in json.dumps(R) and all(isinstance(v, float) for v in R["phases"].values()), R["phases"]
    for name in ("tiny", "nano"):
        s = R[f"size {name}"]
        assert s["gflop_per_img"] > 0 and s["eager"]["batch"] == 2 and s["eager"]["img_s"] > 0
        assert s["eager"]["grad_ckpt"] == (name == "nano")
        assert s["no_ckpt"] == s["grad_ckpt"] == dict(batch=2, stop="oom", peak_gib=None)  # 4 ran out of memory
    assert R["compiled tiny"]["img_s"] > 0 and R["compiled nano"]["compile_s"] > 0
    sdpa = R["sdpa"]
    assert sdpa["forced"]["math"] == "runs" and sdpa["forced"]["efficient_attention"].startswith("fails")  # no CPU kernel
    assert sdpa["default_ops"] == ["aten.bmm"]  # a float mask that needs a gradient takes the math path on a CPU
    n = R["numerics"]
    # bf16 against fp32 at initialisation: the gradient differs by 0.20 in norm on the synthetic set (its
    # background pattern; 0.1-0.2 before it), the loss by 1e-4
    assert n["loss_rel_diff"] < 0.02 and 0 < n["grad_rel_diff"] < 0.3 and n["tiny_nonfinite"] == 0
    assert R["finetune"]["img_s"] > 0 and set(R["data"]) == {"plain", "plain uint8", "ours"}
    R["env"]["peak_tflops"] = 1e-3  # as on a GPU of 1 GFLOP/s: the MFU column fills in
    mfu = R["size tiny"]["eager"]["img_s"] * R["size tiny"]["gflop_per_img"]
    assert f"| {100 * mfu:.1f} % |" in bench.markdown(R)


def test_gpu_report_skips_what_does_not_fit_the_budget(tmp_path):
    path = str(tmp_path / "r.json")
    R = bench.gpu_report(torch.device("cpu"), TINY_PLAN, budget=0, json_path=path)
    assert len(R["phases"]) == 9 and all(v.startswith("skipped") for v in R["phases"].values())
    assert "- sdpa: skipped: needs ~20 s, 0 s left" in open(str(tmp_path / "r.md")).read()


def test_dense_probes_at_tiny_size(one_thread, monkeypatch):
    """detect.py's and segment.py's training steps as the report runs them, tiny at the CPU recipes' sizes: finite
    losses in bf16 autocast (the detector's backbone only), the row and its numbers; out of memory without
    grad checkpointing -> the row with it; out of memory with it too -> marked oom."""
    cpu, bf16 = torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16)
    timing = dict(warmup=1, seconds=0, min_steps=1)
    for task, side in (("detect", 128), ("segment", 64)):
        step, *_ = bench.dense_step(task, "tiny", 2, cpu, bf16, grad_ckpt=False)
        assert all(torch.isfinite(step()) for _ in range(2)), task  # the losses before and after an AdamW step
        row = bench.dense_probe(task, "tiny", 2, cpu, contextlib.nullcontext(), timing)
        assert set(row) == {"task", "model", "img_size", "window", "batch", "grad_ckpt", "img_s", "ms", "peak_gib"}, row
        assert (row["img_size"], row["window"], row["batch"], row["grad_ckpt"], row["peak_gib"]) == (side, 4, 2, False, None)
        assert math.isfinite(row["img_s"]) and row["img_s"] > 0 and math.isfinite(row["ms"]), row
    dense_step, tried = bench.dense_step, []

    def short_of_memory(fits_with_ckpt):
        def step_of(task, name, b, device, ctx, grad_ckpt):
            tried.append(grad_ckpt)
            step, opt, side, window = dense_step(task, name, b, device, ctx, grad_ckpt)
            if grad_ckpt and fits_with_ckpt:
                return step, opt, side, window

            def oom():
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
            return oom, opt, side, window
        return step_of
    monkeypatch.setattr(bench, "dense_step", short_of_memory(fits_with_ckpt=True))
    row = bench.dense_probe("detect", "nano", 2, cpu, contextlib.nullcontext(), timing)
    assert tried == [False, True] and row["grad_ckpt"] and row["img_s"] > 0
    monkeypatch.setattr(bench, "dense_step", short_of_memory(fits_with_ckpt=False))
    assert bench.dense_probe("segment", "nano", 2, cpu, contextlib.nullcontext(), timing) == dict(
        task="segment", model="nano", img_size=64, window=4, batch=2, grad_ckpt=True, oom=True)


def test_a_failing_probe_loses_only_itself(tmp_path, monkeypatch, one_thread):
    """An error other than memory, as an attention kernel at a batch too large for its indexing would raise:
    in the grad_ckpt search of nano at micro-batch 4, and in the segmentation probe. The size's eager row, its
    other search and the detection row stay, and the JSON on disk holds them."""
    checkpoint = swinv2.checkpoint

    def kernel_limit(block, x, **kw):
        if x.shape[0] > 2:
            raise RuntimeError("simulated: CUDA error: invalid configuration argument")
        return checkpoint(block, x, **kw)
    monkeypatch.setattr(swinv2, "checkpoint", kernel_limit)
    dense_probe = bench.dense_probe

    def segment_fails(task, *a):
        if task == "segment":
            raise RuntimeError("simulated: no kernel image is available")
        return dense_probe(task, *a)
    monkeypatch.setattr(bench, "dense_probe", segment_fails)
    plan = dict(TINY_PLAN, micro=2, cap=4, sizes=("nano",), compile=())
    path = tmp_path / "r.json"
    R = bench.gpu_report(torch.device("cpu"), plan, budget=1e6, json_path=str(path))
    assert json.load(open(path)) == json.loads(json.dumps(R))  # what it returned is on disk
    s, d = R["size nano"], R["dense tiny"]
    assert s["eager"]["batch"] == 2 and s["eager"]["grad_ckpt"] and s["eager"]["img_s"] > 0
    assert s["no_ckpt"]["batch"] == 4 and s["no_ckpt"]["stop"] == "cap"
    assert s["grad_ckpt"]["batch"] == 2 and s["grad_ckpt"]["stop"] == "error at 4: RuntimeError: simulated: CUDA error: invalid configuration argument"
    assert d["detect"]["img_s"] > 0 and d["segment"]["error"] == "RuntimeError: simulated: no kernel image is available"
    md = (tmp_path / "r.md").read_text()
    assert "| nano SimMIM, 64 px, eager, grad_ckpt | 2 |" in md and "| tiny UPerNet (error: RuntimeError: simulated" in md
    assert "| 4 (cap) | 2 (error at 4: RuntimeError" in md
    assert all(isinstance(v, float) for v in R["phases"].values()) and "in_progress" not in R


def test_a_phase_that_raises_puts_threads_and_tf32_back(tmp_path, monkeypatch):
    """A phase that raises, with the thread count and TF32 flags changed, gets them back and the next phase
    runs; one that never returns (here interrupted) is named in the files as the phase in progress."""
    flags = lambda: (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    before = flags()

    def meddling(*a, **kw):
        torch.set_num_threads(before[0] + 1)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = not before[1], not before[2]
        raise RuntimeError("simulated")

    def interrupted(*a, **kw):
        torch.set_num_threads(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "numerics_report", meddling)
    monkeypatch.setattr(bench, "finetune_report", interrupted)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        bench.gpu_report(torch.device("cpu"), dict(TINY_PLAN, sizes=(), dense=(), compile=()), budget=1e6, json_path=str(path))
    assert flags() == before
    R = json.load(open(path))
    assert R["numerics"] == dict(error="RuntimeError: simulated") and R["in_progress"] == "finetune"
    assert (tmp_path / "r.md").read_text().endswith("- finetune: in progress\n")


def test_a_long_phase_stops_when_the_time_is_up(tmp_path, monkeypatch, one_thread):
    """The budget is checked inside a phase: after a detection probe that took 135 of the 150 s, the
    segmentation probe does not start, the phase keeps the detection row and says why; the numerics phase's
    tiny run stops after its first step when no time is left."""
    now = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0], process_time=time.process_time))

    def slow_probe(task, name, b, *a):
        now[0] += 135
        return dict(task=task, model=name, img_size=128, window=4, batch=b, grad_ckpt=False, img_s=1.0, ms=2000.0, peak_gib=None)
    monkeypatch.setattr(bench, "dense_probe", slow_probe)
    R = bench.gpu_report(torch.device("cpu"), dict(TINY_PLAN, sizes=(), compile=()), budget=150, json_path=str(tmp_path / "r.json"))
    assert set(R["dense tiny"]) == {"detect", "stopped"} and R["dense tiny"]["detect"]["img_s"] == 1.0
    assert R["dense tiny"]["stopped"] == "time up before segment: it needs ~135 s, 15 s left"
    assert all(R["phases"][k].startswith("skipped") for k in ("numerics", "finetune", "data", "sdpa"))
    md = (tmp_path / "r.md").read_text()
    assert "| tiny Mask R-CNN (bf16 backbone), 128 px, window 4 | 2 | 1 | 2000 |" in md and "- dense tiny: time up before segment" in md
    n = bench.numerics_report("tiny", 2, 3, 2, torch.device("cpu"), contextlib.nullcontext(), time_left=lambda: -1.0)
    assert n["tiny_steps"] == 1 and n["stopped"] == "time up after 1 of 3 tiny steps"


def test_compiled_step_equals_eager(one_thread):
    """The report's compiled rows run train_step through torch.compile (TorchDynamo's graph capture; the
    'eager' backend stands in for inductor's code generation, which takes minutes on a CPU)."""
    steps, losses = [], []
    for backend in (None, "eager"):
        torch.manual_seed(0)
        model, opt = bench.simmim_parts(swinv2.create("tiny", drop_path_rate=0.1), torch.device("cpu"))
        steps.append(bench.train_step(model, opt, contextlib.nullcontext(), backend))
    x, mask = bench.simmim_batch(model.encoder.cfg, 2, torch.device("cpu"))
    for s in range(2):
        for step in steps:
            torch.manual_seed(s)  # the same drop path
            losses.append(torch.stack(step(x, mask)))
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[2], losses[3]) and not torch.equal(losses[0], losses[2])


def test_largest_batch_doubles_halves_and_stops():
    def probe_fitting(limit, seconds=1.0):
        tried = []

        def probe(b):
            tried.append(b)
            return seconds if b <= limit else None
        return probe, tried
    probe, tried = probe_fitting(12)
    assert bench.largest_batch(probe, 4, 64, lambda: 1e9) == (8, "oom") and tried == [4, 8, 16]
    probe, tried = probe_fitting(12)
    assert bench.largest_batch(probe, 32, 64, lambda: 1e9) == (8, "oom") and tried == [32, 16, 8]
    probe, tried = probe_fitting(1000)
    assert bench.largest_batch(probe, 4, 16, lambda: 1e9) == (16, "cap") and tried == [4, 8, 16]
    probe, tried = probe_fitting(1000, seconds=10.0)
    assert bench.largest_batch(probe, 4, 64, lambda: 30.0) == (4, "time") and tried == [4]  # 8 would take ~40 s
    probe, tried = probe_fitting(0)
    assert bench.largest_batch(probe, 4, 64, lambda: 1e9) == (0, "none fits") and tried == [4, 2, 1]

    def broken_from(first_bad):  # an error other than memory ends the search, keeping the batches that ran
        def probe(b):
            if b >= first_bad:
                raise RuntimeError("simulated: an illegal memory access")
            return 1.0
        return probe
    assert bench.largest_batch(broken_from(16), 4, 64, lambda: 1e9) == (8, "error at 16: RuntimeError: simulated: an illegal memory access")
    assert bench.largest_batch(broken_from(1), 4, 64, lambda: 1e9) == (0, "error at 4: RuntimeError: simulated: an illegal memory access")


def test_attempt_tells_memory_from_other_errors(monkeypatch):
    """Out of memory (torch's error, or cuBLAS's in a RuntimeError) -> None after the clean-up; another error
    is raised after it, and is the one raised when a broken CUDA context makes the clean-up fail too."""
    def raising(e):
        def fn():
            raise e
        return fn
    cpu = torch.device("cpu")
    assert bench.attempt(raising(torch.OutOfMemoryError("CUDA out of memory")), cpu) is None
    assert bench.attempt(raising(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")), cpu) is None

    def broken(device):
        raise RuntimeError("CUDA error: the context is broken")
    monkeypatch.setattr(bench, "free", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench.attempt(raising(RuntimeError("CUDA error: an illegal memory access was encountered")), cpu)


def test_memory_line_and_peak_table(monkeypatch):
    assert bench.memory_line({8: 3.0}) == {}
    assert bench.memory_line({4: 2.0, 16: 5.0, 32: 9.0}) == dict(gib_fixed=1.0, gib_per_img=0.25)  # the two largest
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 NVL", None), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        peak, line = bench.peak_tflops(torch.device("cuda"))
        assert peak == tflops and name in line, (name, line)


def test_flops_per_image_match_an_independent_count():
    """SwinV2-B's SimMIM step at 192 px: timm's encoder (timm/models/swin_transformer_v2.py) counted with the
    same FlopCounterMode gives 11.86 GMAC forward, x2 FLOP/MAC x3 for forward + backward = 71.1 GFLOP, and the
    decoder adds ~0.4."""
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = mim.SimMIM(swinv2.create("B"), 47)
    masks = mim.MaskGenerator(192, 32, 4, 0.6)
    mask = torch.stack([masks(0), masks(1)]).to("meta")
    gflop = bench.flops_per_image(model, torch.empty(2, 3, 192, 192, device="meta"), mask, contextlib.nullcontext()) / 1e9
    assert 71.1 < gflop < 71.6, gflop


def test_gpu_mode_without_cuda_fails_in_one_line(monkeypatch):
    """Without a GPU the report measures nothing, and says so with a non-zero exit (a script that runs it
    and keeps its table must not take the silence for a result)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--what", "gpu"])
    assert str(stop.value).count("\n") == 0 and "needs a CUDA GPU" in str(stop.value) and stop.value.code != 0


def test_timm_missing_gives_one_line(capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        bench.main(["--what", "encoder", "--model", "tiny", "--timm"])
    assert "pip install timm" in str(e.value.code) and "\n" not in str(e.value.code)
    assert capsys.readouterr().out == ""  # refused before any work


def test_data_mode_removes_its_temporary_jpegs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rates = bench.main(["--what", "data", "--jpeg_size", "64x48", "--images", "2", "--img_size", "32"])
    assert set(rates) == {"plain", "plain uint8", "ours"} and all(r > 0 for r in rates.values())
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out.count("img per CPU-second") == 1


def test_archives_mode_measures_each_layout_and_removes_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("SIMMIM_INDEX_CACHE", "")  # bench points it into its own temporary folder
    rows = bench.main(["--what", "archives", "--members", "300", "--jpegs", "30", "--images", "4"])
    assert set(rows) == {"index zip", "index tar", "read"} and set(rows["read"]) == {"loose", "zip", "tar"}
    for layout in ("zip", "tar"):
        row = rows[f"index {layout}"]
        assert 30 <= row["bytes_per_image"] <= 60 and row["name_bytes"] > 10 and len(row["worker_private_mb"]) == 2
    assert all(rate > 0 for rate in rows["read"].values())
    assert os.listdir(tmp_path) == []
    out = capsys.readouterr().out
    assert out.count("index ") == 2 and "img per CPU-second of one thread: loose" in out
