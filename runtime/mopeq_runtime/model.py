"""A loaded bundle: ONNX Runtime sessions on the docs/EXPORT.md contract, `forward` with a KV cache, `generate`.

Decoder feeds (EXPORT.md): input_ids | inputs_embeds, attention_mask [B, past+T], position_ids [B, T],
past_key_values.{i}.key/value [B, heads, past, dim] (per-layer shapes in the manifest's model.kv_cache);
outputs logits (float32) and present.{i}.*.
A VLM embeds tokens with embed.onnx and splices vision.onnx features at the image-token positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import BundleError, InputError
from .manifest import GraphEntry, Manifest
from .prompt import VQAFormat, load_image
from .sampling import SamplingConfig, choose
from .tokenizer import BundleTokenizer


@dataclass(frozen=True)
class KernelStatus:
    used: bool  # True: mopeq.MoEExperts runs in libmopeq_ops; False: the ONNX function body runs
    reason: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # the providers the library registers the op for


@dataclass(frozen=True)
class Past:
    """KV cache: present.{i}.key/value of the last call, in layer order (key, value, key, value, ...): numpy
    arrays on the CPU, onnxruntime.OrtValues resident on the GPU (device="cuda")."""

    tensors: tuple
    length: int

    @property
    def batch(self) -> int:
        t = self.tensors[0]
        return int(t.shape()[0] if callable(getattr(t, "shape", None)) else t.shape[0])


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]  # new tokens only (EOS excluded)
    prompt_tokens: int
    stop_reason: str  # "eos" | "length" (max_new_tokens) | "context" (bundle's context length reached)


Stream = Callable[[str], None]


def _io_check(sess, g: GraphEntry) -> None:
    """The session's inputs/outputs must be the manifest's (catches a graph swapped for another)."""
    got = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    want = ([s.name for s in g.inputs], [s.name for s in g.outputs])
    if got != want:
        raise BundleError(f"{g.file} does not have the inputs/outputs its manifest lists; rebuild the bundle")


class BundleModel:
    def __init__(self, root: Path, manifest: Manifest, sessions: dict, kernel: KernelStatus, providers: list[str],
                 target_note: str | None, tokenizer_json: bytes, device: tuple[str, int] = ("cpu", 0)):
        self.root, self.manifest, self.kernel, self.providers = root, manifest, kernel, providers
        # where the KV cache lives between calls: ("cuda", N) keeps it on GPU N through IOBinding (no copy of
        # the cache to the host and back per token); on the CPU, numpy arrays fed and returned as they are
        self.device = device
        self._bound = device[0] != "cpu"
        self.target_note = target_note  # why the bundle runs on a host it was not built for (None if it was)
        for name, sess in sessions.items():
            _io_check(sess, manifest.graph(name))
        self._dec = sessions["decoder"]
        self._embed, self._vision = sessions.get("embed"), sessions.get("vision")
        self.tokenizer = BundleTokenizer(tokenizer_json, manifest.tokenizer)
        self.act_dtype = np.dtype(manifest.target.activation_dtype)
        m = manifest.model
        self.context_length = min(manifest.target.context_length, m.max_position_embeddings)
        self.prompt_format = VQAFormat.from_json(manifest.prompt) if manifest.prompt else None
        self._dec_in = [s.name for s in manifest.graph("decoder").inputs]
        self._dec_out = [s.name for s in manifest.graph("decoder").outputs]
        self._past_in = [n for n in self._dec_in if n.startswith("past_key_values.")]
        # (heads, dim) of every past input, in input order: key, value of layer 0, then layer 1, ...
        self._past_shapes = [hd for kh, kd, vh, vd in m.kv_cache for hd in ((kh, kd), (vh, vd))]

    @property
    def uses_kernel(self) -> bool:
        return self.kernel.used

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids, past: Past | None = None, pixel_values: np.ndarray | None = None):
        """Logits [B, T, V] (float32) for the new tokens and the grown cache."""
        raw = np.asarray(input_ids)
        if raw.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integers, got {raw.dtype} (a float id would be truncated)")
        ids = raw.astype(np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, tokens] with batch >= 1 and at least one token, got shape "
                             f"{ids.shape}")
        b, t = ids.shape
        p = 0 if past is None else past.length
        if p + t > self.context_length:
            raise InputError(f"{p + t} tokens exceed the bundle's context of {self.context_length}; "
                             "shorten the prompt or start a new cache")
        if past is not None and past.batch != b:
            raise InputError(f"past was computed for batch {past.batch}, input_ids have batch {b}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.manifest.model.vocab:
            raise InputError(f"token ids must be in [0, {self.manifest.model.vocab})")
        feeds = {"attention_mask": np.ones((b, p + t), np.int64),
                 "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)))}
        if "inputs_embeds" in self._dec_in:
            feeds["inputs_embeds"] = self._embeds(ids, pixel_values)
        else:
            if pixel_values is not None:
                raise InputError("this bundle's model is text-only; it takes no image")
            feeds["input_ids"] = ids
        if past is None:
            feeds.update({n: np.zeros((b, h, 0, d), self.act_dtype) for n, (h, d) in zip(self._past_in, self._past_shapes)})
        else:
            feeds.update(zip(self._past_in, past.tensors))
        if self._bound:
            return self._run_bound(feeds, p + t)
        out = self._dec.run(self._dec_out, feeds)
        return out[0], Past(tuple(out[1:]), p + t)

    def _run_bound(self, feeds: dict, length: int):
        """One decoder call through IOBinding: the cache (OrtValues) stays on the device, logits come back."""
        kind, index = self.device
        binding = self._dec.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._dec_out[0], "cpu")
        for name in self._dec_out[1:]:
            binding.bind_output(name, kind, index)
        self._dec.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy(), Past(tuple(out[1:]), length)

    def _embeds(self, ids: np.ndarray, pixel_values) -> np.ndarray:
        emb = self._embed.run(None, {"input_ids": ids})[0]
        fmt = self.prompt_format
        if fmt is None:
            return emb.astype(self.act_dtype, copy=False)
        is_img = ids == fmt.image_token_id
        if pixel_values is None:
            if is_img.any():
                raise InputError("the prompt holds image tokens but no image was given")
            return emb.astype(self.act_dtype, copy=False)
        pv = np.asarray(pixel_values)
        want = (ids.shape[0], 3, fmt.image_size, fmt.image_size)
        if pv.shape != want or pv.dtype.kind != "f":
            raise InputError(f"pixel_values must be float [{', '.join(map(str, want))}] (normalised, NCHW), "
                             f"got {pv.dtype} {pv.shape}")
        counts = is_img.sum(1)
        if (counts != fmt.image_tokens).any():
            raise InputError(f"each prompt with an image needs exactly {fmt.image_tokens} image tokens "
                             f"(id {fmt.image_token_id}), got {counts.tolist()}")
        feats = self._vision.run(None, {"pixel_values": pv.astype(self.act_dtype)})[0]
        emb = emb.astype(self.act_dtype, copy=True)
        emb[is_img] = feats.reshape(-1, feats.shape[-1]).astype(self.act_dtype)  # row-major = prompt order
        return emb

    # -- prompts and images ------------------------------------------------------------------------
    def pixel_values(self, image) -> np.ndarray:
        """A path, or uint8 RGB [S, S, 3] -> normalised float [1, 3, S, S]; wrong size/mode is an InputError."""
        fmt = self.prompt_format
        if fmt is None:
            raise InputError("this bundle's model is text-only; it takes no image")
        try:
            arr = load_image(str(image), fmt.image_size) if isinstance(image, (str, Path)) else np.asarray(image)
            if arr.ndim != 3:
                raise ValueError(f"an image must be [H, W, 3] uint8 RGB, got shape {arr.shape}")
            return fmt.pixel_values(arr)
        except ValueError as e:
            raise InputError(str(e)) from None

    def prompt_ids(self, prompt: str | Sequence[int], with_image: bool = False) -> list[int]:
        """Token ids of a prompt; with an image, a text prompt is the question in the bundle's VQA format."""
        if not isinstance(prompt, str):
            ids = list(prompt)
            for i in ids:  # a float id would be truncated silently, a bool taken as 0/1 (the range: forward)
                if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                    raise InputError(f"token ids must be integers; got {i!r}")
            return [int(i) for i in ids]
        if with_image:
            return self.prompt_format.prompt_ids(self.tokenizer.encode, prompt)
        return self.tokenizer.encode(prompt)

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, image=None, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_on_eos: bool = True, stream: Stream | None = None) -> Generation:
        """Greedy (temperature 0) or seeded sampling with a KV cache; `stream` gets each new piece of text."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
        cfg = SamplingConfig(temperature, top_k, top_p, seed)
        pixels = self.pixel_values(image) if image is not None else None
        ids = self.prompt_ids(prompt, with_image=image is not None)
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) > self.context_length:
            raise InputError(f"the prompt has {len(ids)} tokens, longer than the bundle's context of "
                             f"{self.context_length}; shorten it")
        budget = min(max_new_tokens, self.context_length - len(ids))
        rng = np.random.default_rng(seed)
        logits, past = self.forward(np.asarray([ids]), None, pixels)
        new: list[int] = []
        shown, reason = "", "length" if budget == max_new_tokens else "context"
        while len(new) < budget:
            tok = choose(logits[0, -1], cfg, rng)
            if stop_on_eos and tok == self.tokenizer.eos_id:
                reason = "eos"
                break
            new.append(tok)
            if stream is not None:
                shown = self._emit(new, shown, stream)
            if len(new) < budget:
                logits, past = self.forward(np.asarray([[tok]]), past)
        text = self.tokenizer.decode(new)
        if stream is not None and text != shown and text.startswith(shown):
            stream(text[len(shown):])  # the held-back tail (an incomplete character at the very end)
        return Generation(text, tuple(new), len(ids), reason)

    def _emit(self, new: list[int], shown: str, stream: Stream) -> str:
        # decode the whole answer and send the new suffix: byte-level BPE pieces can split a UTF-8 character
        text = self.tokenizer.decode(new)
        if text.endswith("\ufffd") or not text.startswith(shown):
            return shown
        if len(text) > len(shown):
            stream(text[len(shown):])
        return text
