"""Shared by the benchmark scripts in tools/bench: the machine line and the rewrite of one marked
section of docs/performance.md (`<!-- NAME:begin -->` … `<!-- NAME:end -->`), leaving the rest."""

import json
import os
import platform
import subprocess
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOC = os.path.join(ROOT, "docs", "performance.md")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or the machine architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine():
    """One line naming the machine the figures come from."""
    return f"{cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, {time.strftime('%Y-%m-%d')}"


def release_binary(*parts):
    """Path of a release-built binary or example under target/release."""
    return os.path.join(ROOT, "target", "release", *parts)


def run_json(command, **kwargs):
    """Runs `command` and parses the last line of its stdout as JSON."""
    output = subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)
    return json.loads(output.stdout.strip().splitlines()[-1])


def write_section(name, lines):
    """Replaces the body between `name`'s markers in docs/performance.md with `lines`; appends the
    markers at the end when the document lacks them."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(DOC).read() if os.path.exists(DOC) else "# Performance\n"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    before, _, rest = text.partition(begin)
    _, _, after = rest.partition(end)
    section = "\n".join([begin, "", *lines, "", end])
    with open(DOC, "w") as out:
        out.write(before + section + after)
    print(section)
