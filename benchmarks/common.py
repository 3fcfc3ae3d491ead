"""What the benchmarks share: their commands and output folder, the machine's CPU, markdown tables, plots and the
report files (`<name>.json`, `<name>.md`, `<name>.png`).

Standard library only at import time (matplotlib is imported by `pyplot`), so that `benchmarks/readme_results.py`
can use it without torch.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

RESULTS = "benchmarks/results"  # where the benchmarks write by default, from the repository's root


def command(benchmark: str) -> str:
    """The command that runs a benchmark package, as the reports and README quote it.

    Args:
        benchmark (`str`): the package's name under `benchmarks`, e.g. "speed" or "video_qa".

    Returns:
        `str`: e.g. "python -m benchmarks.speed".
    """
    return f"python -m benchmarks.{benchmark}"


def argument_parser(description: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose `--help` shows `description` (a docstring with example commands) as written.

    Args:
        description (`str`, *optional*): the text above the options.
        prog (`str`, *optional*): the command its usage names (e.g. `command("speed")`); default: the script's name.

    Returns:
        `argparse.ArgumentParser`: without options yet.
    """
    formatter = argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)


def cpu_model(fallback: str) -> str:
    """The CPU's model name, from /proc/cpuinfo.

    Args:
        fallback (`str`): the name where /proc/cpuinfo is missing or names no model (not Linux).

    Returns:
        `str`: e.g. "AMD EPYC 7B13".
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return fallback


def table_header(*columns: str) -> list[str]:
    """A markdown table's header line and separator line.

    Args:
        columns (`str`): the column titles.

    Returns:
        `list[str]`: the two lines.
    """
    return [table_row(*columns), "|" + "---|" * len(columns)]


def table_row(*cells: str) -> str:
    """A markdown table's line of `cells`, already formatted."""
    return "| " + " | ".join(cells) + " |"


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str) -> None:
    """Lay `figure` out, write it to `path` (PNG, 110 dpi) and close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def read_json(path: str) -> Any:
    """The contents of the JSON file at `path` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(
    out: str,
    name: str,
    data: Any,
    markdown: Callable[[Any], str],
    plot: Callable[[Any, str], None],
    write_data: bool = True,
) -> str:
    """Write a benchmark's report files into `out`: `name.json` (the data), `name.md` and `name.png`.

    Args:
        out (`str`): the folder (made if missing).
        name (`str`): the files' name without extension, e.g. "speed".
        data (`Any`): what the benchmark measured, JSON-serialisable.
        markdown (`Callable[[Any], str]`): the markdown of `data`.
        plot (`Callable[[Any, str], None]`): draws `data` into a PNG at the path given.
        write_data (`bool`): False to leave `name.json` as it is (rendering from it).

    Returns:
        `str`: the markdown written.
    """
    os.makedirs(out, exist_ok=True)
    if write_data:
        with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    text = markdown(data)
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(data, os.path.join(out, f"{name}.png"))
    return text


def render_report(
    out: str, name: str, markdown: Callable[[Any], str], plot: Callable[[Any, str], None]
) -> tuple[Any, str]:
    """Rewrite `name.md` and `name.png` in `out` from `name.json` there (after a change of the report's code).

    Args:
        out (`str`): the folder of the report.
        name (`str`): the files' name without extension.
        markdown, plot: as in `write_report`.

    Returns:
        `tuple[Any, str]`: the data read and the markdown written.
    """
    data = read_json(os.path.join(out, f"{name}.json"))
    return data, write_report(out, name, data, markdown, plot, write_data=False)
