"""Every `python X.py ...` and `torchrun ... X.py ...` command in README.md parses with that script's
own argument parser, so the README cannot drift from the code."""
import importlib
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(name="README.md"):
    text = open(os.path.join(ROOT, name)).read()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and os.path.exists(os.path.join(ROOT, w))]
            if scripts and ("python" in words[0] or "torchrun" in words):  # torchrun, also after srun
                yield line, words[scripts[0]], words[scripts[0] + 1:]


def test_readme_commands_parse():
    commands = list(readme_commands())
    scripts = {script for _, script, _ in commands}
    assert {"mim.py", "finetune.py", "detect.py", "segment.py", "analyze.py", "bench.py"} <= scripts, scripts
    for line, script, argv in commands:
        module = importlib.import_module(script[:-3])
        argv = [a.replace("$HOST", "localhost") for a in argv]
        try:
            module.get_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README command does not parse: {line}")


def test_readme_torchrun_lines_parse_with_torchrun_itself():
    """torchrun's own options, parsed by the installed torchrun: Python 3.11's argparse refuses an abbreviation
    that matches two options (--nproc: --nproc-per-node or --nproc_per_node), so a README line must spell it."""
    from torch.distributed.run import get_args_parser
    texts = [open(os.path.join(ROOT, f)).read() for f in ("README.md", "mim.py", "finetune.py", "detect.py", "segment.py")]
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
    """miniature.sh's python commands, with its loop variables filled in, parse and resolve."""
    text = open(os.path.join(ROOT, "miniature.sh")).read().replace("\\\n", " ")
    values = {"$model": "nano", "$frac": "0.01", "$iters": "150", "$run": "out/mini/x", "$scratch": "out/mini/s",
              "$OUT": "out/mini", "$FIGS": "miniature", "$seed": "1"}
    found = set()
    for line in text.splitlines():
        words = shlex.split(line.split("#")[0]) if "python " in line and ".py" in line else []
        if "python" not in words or not words[words.index("python") + 1].endswith(".py"):
            continue
        i = words.index("python") + 1
        argv = [re.sub(r"\$\w+", lambda m: values[m.group(0)], w) for w in words[i + 1:]]
        module = importlib.import_module(words[i][:-3])
        args = module.get_parser().parse_args(argv)
        if hasattr(module, "resolve"):
            module.resolve(args, 1)  # the flags are valid together, not only parseable
        found.add(words[i])
    assert found == {"mim.py", "finetune.py", "analyze.py"}, found
