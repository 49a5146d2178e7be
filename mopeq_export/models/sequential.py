"""Calibration data through a model one decoder layer at a time (sequential onloading).

GPTQ needs, for decoder layer i, the inputs that reach it through the already-quantized layers before it.
Running the whole model up to layer i for each i would need every weight resident (or reloaded L times);
instead the hidden states of every calibration batch are carried from one layer to the next, and only the
layer being worked on holds weights (`onload.WeightSource`), the way GPTQ implementations walk a model.

    capture  the model's own forward runs once per batch with every decoder layer replaced by a recorder
             that passes its input through: it records each layer's arguments (attention masks per layer
             type, position embeddings, ...) and the hidden states entering layer 0. What the model adds
             between layers (Qwen3-VL's deepstack visual features) shows up as a difference between one
             layer's input and the previous layer's output, and is added back when chaining.
    run      layer i on every batch's hidden states, with its recorded arguments -> layer i+1's inputs.

Everything outside the decoder layers (embeddings, vision tower, rotary tables) is loaded once for the
capture and freed after it (its buffers stay); the output head never is loaded (the last recorder stops the
forward). A test checks the chained hidden states
against the full model's for every supported architecture.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..calibration import model_inputs
from .adapters import StopForward, decoder_stack, forward_until_stopped
from ..devices import trim_host_heap
from .onload import WeightSource, move_buffers, on_meta, unload


@dataclass
class _Call:
    """One decoder layer call: positional args after the hidden states, and keyword args."""

    args: tuple
    kwargs: dict


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, _Call]:
    if args:
        return args[0], _Call(tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), _Call((), kwargs)


class _Output:
    """What a decoder layer returns: a tensor (transformers 5) or a tuple led by the hidden states."""

    def __init__(self, template: Any):
        self.is_tuple = isinstance(template, (tuple, list))
        self.rest = tuple(template[1:]) if self.is_tuple else ()

    def wrap(self, hidden: torch.Tensor):
        return (hidden, *self.rest) if self.is_tuple else hidden

    def hidden(self, out) -> torch.Tensor:
        return out[0] if self.is_tuple else out


class SequentialRunner:
    """Decoder layers of `model`, one at a time, over calibration `batches` (dicts with `input_ids`, ...).

    With a `source`, `model` is a skeleton and each layer's weights are loaded for its turn and freed after;
    without one, the model is resident and nothing is loaded or freed.
    """

    def __init__(self, model: nn.Module, batches: list[dict], device: torch.device,
                 source: WeightSource | None = None):
        self.model, self.batches, self.device, self.source = model, batches, torch.device(device), source
        self.stack_path, self.stack = decoder_stack(model)
        if source is not None:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            skip = {f"{self.stack_path}."} | ({_path_of(model, head) + "."} if head is not None else set())
            source.load(model, lambda n: not any(n.startswith(p) for p in skip), self.device)
            move_buffers(model, self.device)
        if batches:
            self._capture()
        if source is not None:  # embeddings, vision tower, ...: needed for the capture only
            unload(model, keep=self.stack)
            if self.device.type == "cpu":
                trim_host_heap()

    # -- capture ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _replaced(self, forward_for) -> Iterator[None]:
        for i, layer in enumerate(self.stack):
            layer.forward = forward_for(i)  # instance attribute shadows the class's forward
        try:
            yield
        finally:
            for layer in self.stack:
                del layer.forward

    def _inputs(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}

    def _capture(self) -> None:
        """Layer 0's hidden states per batch, every layer's call arguments, and between-layer additions."""
        first: dict[str, Any] = {}

        def probe(i):
            def forward(*args, **kwargs):
                first["hidden"], first["call"] = _split_hidden(args, kwargs)
                raise StopForward
            return forward

        with self._replaced(probe), torch.no_grad():
            forward_until_stopped(self.model, self._inputs(self.batches[0]))
        with self.loaded(0) as layer0, torch.no_grad():  # what a layer returns, from one real call
            self.output = _Output(layer0(first["hidden"], *first["call"].args, **first["call"].kwargs))

        self.hidden: list[torch.Tensor] = []
        # the float stream's final hidden states, when quantize_sequential runs one (learned rounding) to the end
        self.float_hidden: list[torch.Tensor] | None = None
        self.calls: list[list[_Call]] = [[] for _ in self.stack]
        self.added: list[list[torch.Tensor | None]] = [[] for _ in self.stack]
        last = len(self.stack) - 1
        seen: dict[str, Any] = {}

        def recorder(i):
            def forward(*args, **kwargs):
                hidden, call = _split_hidden(args, kwargs)
                self.calls[i].append(call)
                if i == 0:
                    self.hidden.append(hidden)
                else:
                    prev = seen["out"]
                    self.added[i - 1].append(None if torch.equal(hidden, prev) else hidden - prev)
                seen["out"] = hidden
                if i == last:
                    self.added[last].append(None)
                    raise StopForward
                return self.output.wrap(hidden)
            return forward

        with self._replaced(recorder), torch.no_grad():
            for batch in self.batches:
                forward_until_stopped(self.model, self._inputs(batch))

    # -- layers -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def loaded(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i with its weights on the device (loaded and freed around the block with a source)."""
        layer = self.stack[i]
        if self.source is None:
            yield layer
            return
        prefix = f"{self.stack_path}.{i}."
        load_in_parts(self.source, self.model, layer, prefix, self.device)
        move_buffers(layer, self.device)
        missing = on_meta(layer)
        if missing:
            raise RuntimeError(f"decoder layer {i} has parameters the checkpoint did not provide: {missing[:3]}")
        try:
            yield layer
        finally:
            unload(layer)
            if self.device.type == "cpu":
                trim_host_heap()

    def _layer_outputs(self, i: int, layer: nn.Module, hidden: list[torch.Tensor],
                       on_batch: Callable[[int], None] | None, first: int | None = None,
                       stop_ok: bool = False) -> list[torch.Tensor]:
        """Layer i's outputs per batch on `hidden` (the first `first` batches); a batch whose hooks stop the
        layer early gives none (`stop_ok`) instead of raising."""
        outs = []
        with torch.no_grad():
            for b, (h, call) in enumerate(zip(hidden[:first], self.calls[i][:first])):
                if on_batch is not None:
                    on_batch(b)
                try:
                    outs.append(self.output.hidden(layer(h, *call.args, **call.kwargs)))
                except StopForward:
                    if not stop_ok:
                        raise
        return outs

    def run(self, i: int, layer: nn.Module, *, stop_ok: bool = False,
            on_batch: Callable[[int], None] | None = None, first: int | None = None) -> list[torch.Tensor] | None:
        """Layer i on every batch's current hidden states. Returns the next layer's inputs (and advances to
        them), or None when hooks stop the layer early (`stop_ok`: a capture of what reaches a sub-module;
        `first`: only the first that many batches, for such a capture).
        `on_batch(b)` is called before batch b goes in (hooks use it to know the batch's padding)."""
        if first is not None and not stop_ok:
            raise ValueError("first= is for captures (stop_ok=True): a pass that advances needs every batch")
        outs = self._layer_outputs(i, layer, self.hidden, on_batch, first, stop_ok)
        if stop_ok:
            return None
        self.hidden = self.chain(i, outs)
        return self.hidden

    def outputs(self, i: int, layer: nn.Module, hidden: list[torch.Tensor] | None = None,
                on_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Layer i's outputs per batch (before what the model adds between layers) on `hidden` (default: the
        current hidden states), without advancing: learned rounding compares two streams with it."""
        return self._layer_outputs(i, layer, self.hidden if hidden is None else hidden, on_batch)

    def chain(self, i: int, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer i+1's inputs from layer i's `outputs` (the between-layer additions added back)."""
        return [o if a is None else o + a for o, a in zip(outputs, self.added[i])]


_BIG = 1 << 24  # parameters above 16M elements (fused experts) are loaded one at a time


def load_in_parts(source: WeightSource, model: nn.Module, module: nn.Module, prefix: str, device) -> None:
    """A module's parameters, its big ones (a layer's fused experts) each in its own conversion: the
    transient copies transformers makes while merging experts are one parameter's, not the layer's."""
    big = [prefix + n for n, p in module.named_parameters() if p.numel() > _BIG]
    for name in big:
        source.load(model, lambda n, name=name: n == name, device)
    rest = set(big)
    source.load(model, lambda n: n.startswith(prefix) and n not in rest, device)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
