"""The data files shipped with the toolchain, found the same way from a source checkout and an installed
wheel: `calibration_data/` and `evaluation_data/` are the packages `mopeq_export.calibration_data` and
`mopeq_export.evaluation_data` (pyproject.toml maps them), read through importlib.resources."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CALIBRATION = {False: "text_calib.txt", True: "vqa_calib.npz"}
EVALUATION = {False: "text_eval.txt", True: "vqa_eval.npz"}


def _shipped(package: str, name: str) -> Path | None:
    try:
        entry = resources.files(package).joinpath(name)
    except ModuleNotFoundError:
        return None
    # pip installs wheels as plain files, so the resource is a real path (no zip import)
    return Path(str(entry)) if entry.is_file() else None


def calibration_file(is_vlm: bool) -> Path | None:
    """The shipped calibration set for a text model or a VLM; None if the installation lacks it."""
    return _shipped("mopeq_export.calibration_data", CALIBRATION[is_vlm])


def evaluation_file(is_vlm: bool) -> Path | None:
    """The shipped held-out set (never used for calibration); None if the installation lacks it."""
    return _shipped("mopeq_export.evaluation_data", EVALUATION[is_vlm])
