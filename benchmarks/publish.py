"""Print a benchmark's markdown and append it to its results file (the scripts' one way to record)."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | Path | None) -> None:
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write("\n" + text.strip("\n") + "\n")  # a blank line between appended tables
