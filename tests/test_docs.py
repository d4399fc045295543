"""The documentation's commands still run as written: every `python <script>` and `tmr <command>` in a
fenced bash block of README.md and docs/*.md names a script that exists, and its flags (and config
overrides) parse with the script's own argparse parser, without running the job."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Runs in one interpreter: each command's script is executed with its own argv until its parser has
# parsed it (then stopped), so a renamed flag or an unknown config key fails here as it would for a user.
CHECKER = r'''
import argparse, json, runpy, sys
from tmr.config import load_config

class Parsed(Exception):
    pass

original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))
argparse.ArgumentParser.parse_args = parse_args

failures = []
for where, target, argv in json.loads(sys.stdin.read()):
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv[0] = "tmr"
            runpy.run_module(target, run_name="__main__")
        failures.append(f"{where}: {target} ran without parsing its arguments")
    except Parsed as parsed:
        namespace = parsed.args[0]
        if getattr(namespace, "overrides", None) is not None and hasattr(namespace, "config"):
            try:
                load_config(namespace.config, namespace.overrides)
            except (KeyError, ValueError, FileNotFoundError) as error:
                failures.append(f"{where}: {error}")
    except SystemExit as exit:
        failures.append(f"{where}: the parser refused {argv} (exit {exit.code})")
print(json.dumps(failures))
'''


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, script or module, argv) for every python/tmr invocation in the docs' bash blocks."""
    found = []
    for path in DOCS:
        for block in bash_blocks(path):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                line = pending + line.split("  #")[0].strip()
                line = re.sub(r"\$\([^)]*\)", "/tmp/x", line).replace("$PWD", "/tmp")
                try:
                    words, pending = shlex.split(line, comments=True), ""
                except ValueError:  # a quoted string goes on on the next line
                    pending = line + " "
                    continue
                parts = [[]]
                for word in words:  # split the line into simple commands
                    if word in ("&&", "||", ";", "|", "--"):
                        parts.append([])
                    else:
                        parts[-1].append(word)
                for words in parts:
                    where = f"{path.name}: {' '.join(words)[:80]}"
                    if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
                        found.append((where, words[1], words[2:]))
                    elif words[:1] == ["tmr"]:
                        found.append((where, "tmr.cli", words[1:]))
    return found


def test_every_documented_command_names_a_script_whose_flags_parse():
    found = commands()
    scripts = {target for _, target, _ in found}
    # the README's main job, its job submission, the sweep, the comparison, the index build, the CLI
    assert {"jobs/train.py", "tune/sweep.py", "tune/compare.py", "jobs/index.py", "tmr.cli"} <= scripts
    missing = [f"{where}: no {target}" for where, target, _ in found
               if target.endswith(".py") and not (ROOT / target).is_file()]
    assert not missing, missing
    checked = subprocess.run([sys.executable, "-c", CHECKER], input=json.dumps(found), cwd=ROOT, text=True,
                             capture_output=True, timeout=600)
    assert checked.returncode == 0, checked.stderr[-3000:]
    failures = json.loads(checked.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


def test_the_checker_catches_a_renamed_flag_and_an_unknown_key():
    """The negative control: the same checker refuses what a user would be refused."""
    bad = [("x", "jobs/train.py", ["--config", "cpu", "--wokers", "2"]),
           ("y", "jobs/train.py", ["--config", "cpu", "train.epoch=3"]),
           ("z", "tmr.cli", ["eval", "--modle", "runs/cpu/best"])]
    checked = subprocess.run([sys.executable, "-c", CHECKER], input=json.dumps(bad), cwd=ROOT, text=True,
                             capture_output=True, timeout=600)
    failures = json.loads(checked.stdout.strip().splitlines()[-1])
    assert [f.split(":")[0] for f in failures] == ["x", "y", "z"], failures
