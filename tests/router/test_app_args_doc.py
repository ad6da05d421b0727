"""docs/API.md's table of app args says what `build_app` accepts: every `AppArgs` field and
nothing else, and every mode the app builds (it once called disaggregated mode "not built yet"
long after it was)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tandem.workers.app import MODES, AppArgs

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "API.md"


def app_args_rows() -> dict[str, str]:
    """First-column names of the "App args" table -> their row's text."""
    section = API_DOC.read_text().split("## App args", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`" in cells[1]:
            for name in re.findall(r"`([a-z_]+)`", cells[1]):
                rows[name] = cells[2]
    return rows


def test_the_table_lists_every_app_arg_and_no_other():
    assert set(app_args_rows()) == {f.name for f in dataclasses.fields(AppArgs)}


def test_the_mode_row_names_every_mode_as_built():
    mode = app_args_rows()["mode"]
    assert all(f"`{m}`" in mode for m in MODES), mode
    assert "not built" not in mode and "not built yet" not in API_DOC.read_text()
