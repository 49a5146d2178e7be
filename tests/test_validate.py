"""The accuracy gate's pieces that need no exported model: verdicts, runtime-backed callables."""

from __future__ import annotations

import numpy as np
import torch

import mopeq_runtime
from fake_export import make_fake_bundle
from mopeq_export.validate import GateConfig, _verdict, runtime_forward, runtime_generate


def test_verdict_thresholds():
    g = GateConfig()
    text = {"ppl_ratio": 1.0501, "ppl_ref": 14.85, "ppl": 15.59}
    assert _verdict("text", text, g) and "1.0501 > 1.05" in _verdict("text", text, g)[0]
    assert not _verdict("text", {**text, "ppl_ratio": 1.05}, g)
    vqa = {"accuracy_retention": 0.98, "accuracy_ref": 0.9, "accuracy": 0.882}
    assert _verdict("vqa", vqa, g) and not _verdict("vqa", vqa, GateConfig(min_vqa_retention=0.9))


def test_runtime_callables_match_the_runtime(tmp_path):
    m = mopeq_runtime.load(make_fake_bundle(tmp_path))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    logits = runtime_forward(m)({"input_ids": ids})
    np.testing.assert_array_equal(logits.numpy(), m.forward(ids.numpy())[0])
    eos = m.tokenizer.eos_id
    got = runtime_generate(m, eos)({"input_ids": ids}, 4)
    for row, seq in zip(ids.tolist(), got):
        assert list(m.generate(row, max_new_tokens=4).token_ids) == seq
