"""Where every benchmark puts its result, so that `make bench` is one report.

Each script in bench/ ends by calling `save(key, title, table, data)`: the markdown table it
printed, its raw figures (JSON-able) and a few lines on how to read them. They land in
`$MTFT_BENCH_OUT/sections/<key>.json` (default `runs/bench`), one file per section, so a
section can be rerun alone and the report rebuilt from what is there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def out_dir() -> Path:
    return Path(os.environ.get("MTFT_BENCH_OUT", "runs/bench"))


def save(key: str, title: str, table: str, data: Any, notes: Sequence[str] = (),
         plots: Sequence[Path] = ()) -> Path:
    """Write one section; `plots` are PNG files already written under `out_dir()`."""
    folder = out_dir() / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    section = {"key": key, "title": title, "table": table, "data": data, "notes": list(notes),
               "plots": [str(Path(p).resolve().relative_to(out_dir().resolve())) for p in plots],
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(section, indent=1, default=str))
    tmp.replace(path)
    return path
