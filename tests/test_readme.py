"""Every `python X.py ...` and `torchrun ... X.py ...` command in README.md parses with that script's
own argument parser, so the README cannot drift from the code."""
import importlib
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and os.path.exists(os.path.join(ROOT, w))]
            if scripts and ("python" in words[0] or "torchrun" in words[0]):
                yield line, words[scripts[0]], words[scripts[0] + 1:]


def test_readme_commands_parse():
    commands = list(readme_commands())
    scripts = {script for _, script, _ in commands}
    assert {"mim.py", "finetune.py", "analyze.py", "bench.py"} <= scripts, scripts
    for line, script, argv in commands:
        module = importlib.import_module(script[:-3])
        argv = [a.replace("$HOST", "localhost") for a in argv]
        try:
            module.get_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README command does not parse: {line}")
