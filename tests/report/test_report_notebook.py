"""The offline notebook renderer's chart outputs draw in Chromium with every network request refused,
also when several outputs share one page (as in a notebook)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import normtrace_analysis as na
import pytest
from normtrace_analysis.notebook import render


@pytest.mark.browser
def test_two_chart_outputs_draw_offline_in_one_page(browser: Any, run_a: Path, tmp_path: Path) -> None:
    trace = na.load(run_a)
    outputs = [
        render(na.charts.norms(trace).to_dict())["text/html"],
        render(na.charts.share(trace).to_dict())["text/html"],
    ]
    page_file = tmp_path / "notebook.html"
    page_file.write_text(
        "<!DOCTYPE html><html><body>"
        + "".join(f"<div class=cell>{o}</div>" for o in outputs)
        + "</body></html>"
    )
    page = browser.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.route(re.compile(r"^https?://"), lambda route: route.abort())
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(page_file.as_uri())
    page.wait_for_function(
        "() => [...document.querySelectorAll('.cell > div')].every(el => el.querySelector('svg.marks, canvas'))",
        timeout=30_000,
    )
    marks = page.eval_on_selector_all(
        ".cell > div", "els => els.map(el => el.querySelectorAll('path').length)"
    )
    page.close()
    assert errors == []
    assert requests == [page_file.as_uri()]
    assert all(n > 0 for n in marks)
