"""`lcdistill report RUN`: a self-contained HTML page and PNG plots of a real (tiny) LONDON run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from html.parser import HTMLParser

import pytest

from conftest import EVAL, assert_user_error, cli, cli_ok

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects <img> sources and table cells, and fails on unbalanced tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.in_cell = [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)
        self.in_cell = tag == "td"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.cells.append(data)


def parse(path) -> Page:
    text = path.read_text()
    assert text.startswith("<!doctype html>")
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == [], f"unclosed tags {page.stack}"
    assert not re.search(r'src="(?!data:)', text), "the page links to a file instead of embedding it"
    return page


@pytest.fixture
def run(compress_run, tmp_path):
    """A copy of the one-epoch LONDON student (the shared fixture stays untouched)."""
    return shutil.copytree(compress_run("london"), tmp_path / "run")


def test_report_with_eval_and_lipschitz(run, small_data):
    cli_ok("eval", run, "--data", small_data, "--save", run / "eval.json", *EVAL, "--batch-size", "16")
    result = cli_ok("report", run, "--data", small_data, "--device", "cpu")
    assert f"report: {run / 'report.html'}" in result.stdout

    plots = {p.name: p for p in (run / "plots").iterdir()}
    assert set(plots) == {"loss.png", "top1.png", "lipschitz.png", "side_by_side.png"}  # eval.json's rows as bars: teacher, student
    page = parse(run / "report.html")
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert len(embedded) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert sorted(embedded) == sorted(p.read_bytes() for p in plots.values())
    assert all(data.startswith(PNG) for data in embedded)

    # the table is eval.json's, teacher first
    evaluation = json.loads((run / "eval.json").read_text())
    assert page.cells[0] == "teacher" and "student" in page.cells
    assert f"{evaluation['student']['top1']:.2f}" in page.cells
    # --data computed the Lipschitz numbers once and kept them
    lip = json.loads((run / "lipschitz.json").read_text())
    assert lip["stages"] and lip["stages"][0]["teacher"] > 0
    # at 32 px the stride-32 map is 1x1: london left that transmitting matrix out and trained no connector for it,
    # and the row (and the chart, where the bar would stand) says so
    *matched, last = lip["stages"]
    assert all(row["connected"] is not None and "connected_note" not in row for row in matched)
    assert last["connected"] is None and "1x1 at 32 px" in last["connected_note"] and "london.min_positions 4" in last["connected_note"]
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))


def test_report_from_student_json_alone(run):
    cli_ok("report", run)
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "top1.png"}
    page = parse(run / "report.html")
    assert len(page.images) == 2
    meta = json.loads((run / "student.json").read_text())
    assert f"{meta['top1']:.2f}" in page.cells and f"{meta['teacher']['top1']:.2f}" in page.cells
    text = (run / "report.html").read_text()
    assert "lcdistill lipschitz RUN --data DIR --json" in text  # says how to get the missing chart


def test_loss_parts_are_the_methods_losses(run):
    from lcdistill.report import loss_parts, read_summary

    assert set(loss_parts(read_summary(run))) == {"loss", "ce", "kd", "lip"}


def test_report_without_matplotlib(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    line = assert_user_error(cli("report", run), "matplotlib")
    assert "pip install 'lcdistill[report]'" in line
    assert not (run / "report.html").exists()


def test_report_of_non_run(tmp_path):
    assert_user_error(cli("report", tmp_path), str(tmp_path), "not a finished")


def test_report_eval_option(run, tmp_path):
    saved = tmp_path / "elsewhere.json"  # as `make demo` keeps it: beside the run, not in it
    saved.write_text(json.dumps({"student": {"top1": 12.345, "top5": 50.0, "kind": "pytorch"},
                                 "onnx-int8": {"top1": 11.5, "top5": 49.0, "kind": "onnx", "file_bytes": 1_000_000}}))
    cli_ok("report", run, "--eval", saved)
    page = parse(run / "report.html")
    assert page.cells[:1] == ["student"] and "12.35" in page.cells and "onnx-int8" in page.cells
    assert_user_error(cli("report", run, "--eval", tmp_path / "missing.json"), "missing.json")
