"""Every `python X.py ...` and `torchrun ... X.py ...` command in README.md and docs/*.md parses with that
script's own argument parser, so the documentation cannot drift from the code."""
import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def readme_commands(name="README.md"):
    text = open(os.path.join(ROOT, name)).read()
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):  # fence to fence
        if lang not in ("", "bash", "sh"):  # docs/data.md's Python snippets run in tests/test_archives.py
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and os.path.exists(os.path.join(ROOT, w))]
            if scripts and ("python" in words[0] or "torchrun" in words):  # torchrun, also after srun
                yield line, words[scripts[0]], words[scripts[0] + 1:]


def test_readme_and_docs_commands_parse():
    assert len(DOCS) >= 10, DOCS  # the front page and the manual's pages
    commands = [(name, *c) for name in DOCS for c in readme_commands(name)]
    scripts = {script for _, _, script, _ in commands}
    assert {"mim.py", "finetune.py", "detect.py", "segment.py", "analyze.py", "bench.py", "study.py"} <= scripts, scripts
    assert {"mim.py", "finetune.py"} <= {script for name, _, script, _ in commands if name == "README.md"}
    for name, line, script, argv in commands:
        module = importlib.import_module(script[:-3])
        argv = [a.replace("$HOST", "localhost") for a in argv]
        try:
            module.get_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"{name}: command does not parse: {line}")


def test_readme_torchrun_lines_parse_with_torchrun_itself():
    """torchrun's own options, parsed by the installed torchrun: Python 3.11's argparse refuses an abbreviation
    that matches two options (--nproc: --nproc-per-node or --nproc_per_node), so a README line must spell it."""
    from torch.distributed.run import get_args_parser
    texts = [open(os.path.join(ROOT, f)).read() for f in DOCS + ["mim.py", "finetune.py", "detect.py", "segment.py"]]
    lines = [line for text in texts for line in text.replace("\\\n", " ").splitlines() if re.match(r"\s*torchrun --", line)]
    assert len(lines) >= 5, lines
    for line in lines:
        words = shlex.split(line.split("#")[0].replace("$HOST", "localhost"))
        try:
            args = get_args_parser().parse_args(words[1:])
        except SystemExit:
            raise AssertionError(f"torchrun refuses: {line.strip()}")
        assert args.training_script.endswith(".py"), line


def test_miniature_script_commands_parse():
    """miniature.sh's runs (its `queue RUN_DIR SCRIPT FLAGS` lines) and its analyze.py command, with the
    shell variables filled in, parse and resolve."""
    text = open(os.path.join(ROOT, "miniature.sh")).read().replace("\\\n", " ")
    values = {"model": "nano", "frac": "0.01", "iters": "150", "run": "out/mini/x", "OUT": "out/mini", "FIGS": "miniature",
              "seed": "1"}
    found = set()
    for line in text.splitlines():
        if not line.strip().startswith(("queue ", "python analyze.py")):
            continue
        words = shlex.split(line.split("#")[0])
        if words[0] == "queue":
            script, argv = words[2], words[3:] + ["--out_dir", words[1]]
        elif words[:2] == ["python", "analyze.py"]:
            script, argv = words[1], words[2:]
        argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], w) for w in argv]
        module = importlib.import_module(script[:-3])
        args = module.get_parser().parse_args(argv)
        if hasattr(module, "resolve"):
            module.resolve(args, 1)  # the flags are valid together, not only parseable
        found.add(script)
    assert found == {"mim.py", "finetune.py", "detect.py", "segment.py", "analyze.py"}, found


def test_miniature_script_runs_what_is_missing_in_order_and_stops_on_a_failure(tmp_path):
    """miniature.sh's plumbing, with a stand-in `python` that records its arguments and writes the run's
    summary.json: every run once, pre-trainings before what starts from them, logs named after the run,
    complete runs skipped on a rerun, and a failed run stops the script before analyze.py."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\ncase "$*" in *"$FAIL"*) [ -n "$FAIL" ] && exit 1;; esac\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --out_dir ] && mkdir -p "$2" && echo {} > "$2/summary.json"; shift; done\n')
    stub.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}", CALLS=str(calls), OUT=str(out),
               FIGS=str(tmp_path / "figs"), FAIL="")

    def run(**extra):
        calls.write_text("")
        done = subprocess.run(["bash", os.path.join(ROOT, "miniature.sh")], env=dict(env, **extra), capture_output=True, text=True)
        return done.returncode, [line.split()[0] for line in calls.read_text().splitlines()], done.stderr

    # one run at a time, so the start order is the queue's: pre-trainings, then the longest runs first
    rc, scripts, _ = run(JOBS="1")
    assert rc == 0 and len(scripts) == 16 + 10 + 16 * 3 + 2 * 3 + 1 and scripts[-1] == "analyze.py"
    assert set(scripts[:16]) == {"mim.py"} and scripts[16:21] == ["detect.py"] * 5  # longest first
    assert scripts.count("segment.py") == 5 and scripts.count("finetune.py") == 54
    assert (out / "tiny_frac0.01_600" / "ft_s2" / "summary.json").exists() and (out / "scratch" / "nano_s0" / "summary.json").exists()
    assert (out / "logs" / "tiny_frac0.01_600_det_s0.txt").exists() and (out / "logs" / "scratch_tiny_seg_s0.txt").exists()
    assert run() == (0, ["analyze.py"], "")  # all complete: only the analysis again
    # two at a time (the default): two runs start together, so their lines may come in either order
    shutil.rmtree(out)
    rc, parallel, _ = run()
    assert rc == 0 and sorted(parallel) == sorted(scripts) and set(parallel[:16]) == {"mim.py"} and parallel[-1] == "analyze.py"
    for d in ("nano_frac1_150/ft_s1", "nano_frac1_150/ft_s2"):
        os.remove(out / d / "summary.json")
    rc, scripts, err = run(FAIL="ft_s1", JOBS="1")
    assert rc != 0 and scripts == ["finetune.py"] and "failed: python finetune.py" in err  # ft_s2 never started


def test_the_readme_walk_points_at_the_functions_it_names():
    """The front page's walk through one pre-training step names file:line and a function: the line must be
    that function's (or class's) definition, so the walk cannot drift when the code moves."""
    text = open(os.path.join(ROOT, "README.md")).read()
    steps = re.findall(r"\[`(\w+\.py):(\d+)`\]\(\1#L\2\) `([\w.]+)`", text)
    assert len(steps) >= 10, steps
    for path, line, name in steps:
        source = open(os.path.join(ROOT, path)).read().splitlines()[int(line) - 1]
        assert re.match(rf"\s*(def|class) {re.escape(name.split('.')[-1])}\b", source), (path, line, name, source)
