"""Load a checkpoint piece by piece: a model skeleton without weights, then the parameters of one module
at a time, read from the safetensors shards and converted by transformers' own loading rules.

Why not `from_pretrained`: it materializes every weight at once, and transformers 5 turns per-expert
checkpoint tensors into fused ``gate_up_proj`` / ``down_proj`` copies while doing so. The stages that must
stay within memory at real size (quantize and export hold one decoder layer, or only the non-expert
weights) need the parameters of a chosen module and nothing else.

- `skeleton`: the model class built from its config with parameters on the meta device (no memory) and
  buffers real (rotary tables and the like are computed at construction, never stored in the checkpoint).
- `WeightSource`: the shards opened with safetensors' ``pread`` backend (no memory map, so the bytes read
  are the bytes resident), each checkpoint key mapped to the model parameter it feeds with transformers'
  conversion mapping (renames, experts merged and concatenated, ...). `load(model, select, device)` loads
  the parameters whose name `select` accepts through ``convert_and_load_state_dict_in_model``, the function
  `from_pretrained` itself uses. A test checks, for every supported architecture, that loading module by
  module gives exactly `from_pretrained`'s parameters.
- `unload(module)`: its parameters back to meta (freed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import MopeqError
from .loading import weight_files

Select = Callable[[str], bool]  # model parameter name -> load it?


def _transformers_loading():
    """The pieces of transformers' loader used here (one import place: a version that moves them fails clearly)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     convert_and_load_state_dict_in_model, rename_source_key)
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        import transformers

        raise MopeqError(f"transformers {transformers.__version__} lacks the loading API this tool uses ({e}); "
                         "install transformers>=5.17,<6") from None
    return (get_model_conversion_mapping, WeightConverter, WeightRenaming, convert_and_load_state_dict_in_model,
            rename_source_key, LoadStateDictConfig)


def auto_class(config, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM


def read_config(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MopeqError(f"{model_dir} needs its own code; rerun with --trust-remote-code if you trust it") from None
        raise MopeqError(f"cannot read the config in {model_dir}: {e}") from None


def skeleton(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
             trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint's model class with parameters on the meta device and real buffers, in eval mode."""
    from accelerate import init_empty_weights

    config = read_config(model_dir, trust_remote_code)
    try:
        with init_empty_weights(include_buffers=False):
            model = auto_class(config).from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                   trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise MopeqError(f"cannot build the model of {model_dir}: {str(e).splitlines()[0]}") from None
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a progress bar per load call; a layer-by-layer load would print hundreds."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class WeightSource:
    """The shards of a checkpoint folder, read on demand into the parameters of a `skeleton` model."""

    def __init__(self, model_dir: str | Path, model: nn.Module):
        from safetensors import safe_open

        get_mapping, self._Converter, self._Renaming, self._convert_and_load, rename, self._Config = \
            _transformers_loading()
        self.model_dir = Path(model_dir)
        self.mapping = get_mapping(model)
        renamings = [m for m in self.mapping if isinstance(m, self._Renaming)]
        converters = [m for m in self.mapping if isinstance(m, self._Converter)]
        meta = model.state_dict()
        self.handles, self.target, self.nbytes = [], {}, {}
        for f in weight_files(self.model_dir):
            h = safe_open(str(f), framework="pt", backend="pread")  # pread: reads are copies, nothing mapped
            self.handles.append(h)
            for key in h.keys():
                name, _ = rename(key, renamings, converters, model.base_model_prefix, meta)
                self.target[key] = (h, name)
                sl = h.get_slice(key)
                count = 1
                for d in sl.get_shape():
                    count *= d
                self.nbytes[key] = count * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        self.known = {name for _, name in self.target.values()}

    def keys_for(self, select: Select) -> list[str]:
        return [k for k, (_, name) in self.target.items() if select(name)]

    def bytes_for(self, select: Select) -> int:
        """Checkpoint bytes of the tensors that feed the parameters `select` accepts."""
        return sum(self.nbytes[k] for k in self.keys_for(select))

    def load(self, model: nn.Module, select: Select, device: torch.device | str) -> set[str]:
        """Load every parameter whose name `select` accepts onto `device`, in the dtype the skeleton gave it
        (transformers casts to the empty parameter's dtype); returns the names loaded."""
        keys = self.keys_for(select)
        if not keys:
            return set()
        # safetensors cannot slice a tensor with a zero-sized dimension: such tensors (a checkpoint's empty
        # modules) are read whole, which costs nothing
        state = {k: self.target[k][0].get_tensor(k) if self.nbytes[k] == 0 else self.target[k][0].get_slice(k)
                 for k in keys}
        cfg = self._Config(device_map={"": str(device)}, dtype=None, weight_mapping=self.mapping)
        with _quiet_transformers():
            info, _ = self._convert_and_load(model, state, cfg)
        if info.conversion_errors or info.mismatched_keys:
            problems = list(info.conversion_errors.items())[:2] or sorted(info.mismatched_keys)[:2]
            raise MopeqError(f"{self.model_dir}: the checkpoint does not fit its config ({problems}); "
                             "is it complete and unmodified?")
        loaded = {self.target[k][1] for k in keys}
        return {n for n, _ in model.named_parameters() if n in loaded} | {n for n, _ in model.named_buffers() if n in loaded}

    def close(self) -> None:
        self.handles.clear()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def move_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Buffers of a skeleton live on the CPU; the module computes on `device`."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                sub._buffers[name] = buf.to(device)


def unload(module: nn.Module, keep: nn.Module | None = None) -> None:
    """Free a module's parameters (back to the meta device), except those of `keep`; its buffers stay."""
    kept = {id(p) for p in keep.parameters()} if keep is not None else set()
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta" and id(p) not in kept:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def on_meta(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.device.type == "meta"]


def load_full(model_dir: str | Path, model: nn.Module, source: WeightSource, device: torch.device,
              chunks: list[str] | None = None, select: Select = lambda n: True) -> None:
    """Every parameter of `model` that `select` accepts, one chunk (module prefix) at a time so conversions
    stay small, then the tied weights; buffers move to `device`. Raises if a parameter is still missing."""
    prefixes = chunks or []
    for prefix in prefixes:
        source.load(model, lambda n, p=prefix: n.startswith(p) and select(n), device)
    source.load(model, lambda n: not any(n.startswith(p) for p in prefixes) and select(n), device)
    move_buffers(model, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = on_meta(model)
    if missing:
        raise MopeqError(f"{model_dir} has no weights for {', '.join(missing[:3])}"
                         + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
                         + "; the checkpoint does not match its config")
