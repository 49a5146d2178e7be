"""Run an exported folder in ONNX Runtime the way docs/EXPORT.md says a runtime should (numpy only).

Used by the export tests, scripts/check_export_ppl.py and scripts/bench_decode.py; it is a checker of the
contract, not the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def session(path: Path, kernel: bool, threads: int = 1):
    """kernel=True registers libmopeq_ops (fast path); False leaves stock ORT to inline the function bodies."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if kernel:
        from mopeq_runtime.native import library_path

        so.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Exported:
    """An export folder: its record plus lazily opened sessions."""

    def __init__(self, folder: str | Path, kernel: bool = True, threads: int = 1):
        self.folder = Path(folder)
        self.record = json.loads((self.folder / "export.json").read_text())
        self.kernel, self.threads = kernel, threads
        self.dtype = NP_DTYPES[self.record["activation_dtype"]]
        self.shape = self.record["model"]
        self._sessions: dict = {}

    def sess(self, graph: str):
        if graph not in self._sessions:
            self._sessions[graph] = session(self.folder / self.record["graphs"][graph]["file"], self.kernel,
                                            self.threads)
        return self._sessions[graph]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), self.dtype) for kh, kd, vh, vd in self.shape["kv_cache"]
                for h, d in ((kh, kd), (vh, vd))]

    def step(self, tokens: np.ndarray, past: list[np.ndarray], mask: np.ndarray | None = None,
             positions: np.ndarray | None = None):
        """One decoder call; `tokens` are ids [B,S] (text) or embeddings [B,S,H] (VLM). Returns logits, present."""
        batch, seq = tokens.shape[:2]
        start = past[0].shape[2]
        if mask is None:
            mask = np.ones((batch, start + seq), np.int64)
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + seq), (batch, seq)).astype(np.int64)
        feeds = {"inputs_embeds" if tokens.ndim == 3 else "input_ids": tokens, "attention_mask": mask,
                 "position_ids": positions}
        for i in range(self.shape["num_layers"]):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.sess("decoder").run(None, feeds)
        return out[0], out[1:]

    def embed(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
        """VLM: token embeddings with the image features spliced in at the image-token positions."""
        emb = self.sess("embed").run(None, {"input_ids": input_ids})[0]
        if pixel_values is not None:
            feats = self.sess("vision").run(None, {"pixel_values": pixel_values.astype(self.dtype)})[0]
            where = input_ids == self.record["vision"]["image_token_id"]
            emb[where] = feats.reshape(-1, feats.shape[-1])[: int(where.sum())].astype(emb.dtype)
        return emb
