"""The export stage's record: ODIR/export.json as a typed value, and its one reader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mopeq_export.errors import MopeqError


@dataclass(frozen=True)
class ExportedModel:
    """An export folder: where it is, the target it was made for, its graphs (name -> file and I/O) and the
    whole export.json (docs/EXPORT.md describes every field)."""

    path: Path
    target: str
    graphs: dict[str, dict]
    record: dict

    @property
    def schema_version(self) -> int:
        return int(self.record["schema_version"])


def read_export(odir: str | Path) -> ExportedModel:
    """Read ODIR/export.json, checking the schema and that every graph file it names is present."""
    from .api import EXPORT_SCHEMA_VERSION

    odir = Path(odir)
    path = odir / "export.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MopeqError(f"{odir} is not an export folder (no export.json); create one with mopeq-export export") from None
    except (OSError, ValueError) as e:
        raise MopeqError(f"{path} cannot be read ({e}); re-run mopeq-export export") from None
    if not isinstance(rec, dict) or rec.get("schema_version") != EXPORT_SCHEMA_VERSION:
        found = rec.get("schema_version") if isinstance(rec, dict) else None
        raise MopeqError(f"{path}: export schema {found} is not {EXPORT_SCHEMA_VERSION}; re-run mopeq-export export")
    graphs = rec.get("graphs")
    if not isinstance(graphs, dict) or "decoder" not in graphs:
        raise MopeqError(f"{path} names no decoder graph; re-run mopeq-export export")
    for name, g in graphs.items():
        if not (odir / g["file"]).is_file():
            raise MopeqError(f"{odir}: the {name} graph {g['file']} is missing; re-run mopeq-export export")
    return ExportedModel(odir, rec["target"]["name"], graphs, rec)
