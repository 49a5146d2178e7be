"""Find the MoE layers of a model and give every stage one view of their routed experts.

Two expert layouts are supported:

- ``fused``: transformers 5 experts classes holding ``gate_up_proj [E, 2I, H]`` and
  ``down_proj [E, H, I]`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, Qwen3-VL-MoE, ...).
- ``modulelist``: an ``nn.ModuleList`` of gated MLPs with ``gate_proj``/``up_proj``/``down_proj``
  (remote-code DeepSeek-VL2 and MolmoE, transformers 4 style).

Whatever the layout, an expert is seen as two matrices in the canonical orientation of
docs/FORMAT.md: ``w1 = [gate; up]`` of shape ``[2I, H]`` and ``w2`` of shape ``[H, I]``.
Experts are named ``<experts module path>.<index>``, e.g. ``model.layers.3.mlp.experts.7``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import MopeqError

RoutingCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _activation_name(act: nn.Module | None) -> str:
    name = type(act).__name__.lower() if act is not None else "silu"
    if "silu" in name or "swish" in name:
        return "silu"
    if "gelu" in name:
        return "gelu"
    raise MopeqError(f"expert activation {type(act).__name__} is not supported (supported: SiLU, GELU)")


@dataclass
class MoELayer:
    """One MoE block: its routed experts and where they live in the model."""

    layer: int  # decoder layer number (from the module path)
    block_path: str
    experts_path: str
    block: nn.Module
    experts: nn.Module
    layout: str  # "fused" | "modulelist"
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    shared_expert_path: str | None = None
    transposed: bool = False  # fused weights stored as [E, H, 2I] / [E, I, H]

    def expert_name(self, e: int) -> str:
        return f"{self.experts_path}.{e}"

    @property
    def expert_names(self) -> list[str]:
        return [self.expert_name(e) for e in range(self.num_experts)]

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    # -- weights in canonical orientation -------------------------------------------------
    def get_w1(self, e: int) -> torch.Tensor:
        if self.layout == "fused":
            w = self.experts.gate_up_proj[e]
            return (w.t() if self.transposed else w).detach().float().clone()
        m = self.experts[e]
        return torch.cat([m.gate_proj.weight, m.up_proj.weight], 0).detach().float().clone()

    def get_w2(self, e: int) -> torch.Tensor:
        if self.layout == "fused":
            w = self.experts.down_proj[e]
            return (w.t() if self.transposed else w).detach().float().clone()
        return self.experts[e].down_proj.weight.detach().float().clone()

    @torch.no_grad()
    def set_weights(self, e: int, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """Overwrite expert e in place (used by fake-quant evaluation and layer-by-layer GPTQ)."""
        if self.layout == "fused":
            gu, dn = self.experts.gate_up_proj, self.experts.down_proj
            gu[e].copy_((w1.t() if self.transposed else w1).to(gu.dtype))
            dn[e].copy_((w2.t() if self.transposed else w2).to(dn.dtype))
            return
        m, i = self.experts[e], self.intermediate_size
        m.gate_proj.weight.copy_(w1[:i].to(m.gate_proj.weight.dtype))
        m.up_proj.weight.copy_(w1[i:].to(m.up_proj.weight.dtype))
        m.down_proj.weight.copy_(w2.to(m.down_proj.weight.dtype))

    def hessian_params(self) -> list[tuple[nn.Parameter, int | None]]:
        """Parameters holding the routed experts: (param, expert) where expert None means dim 0 is the expert axis."""
        if self.layout == "fused":
            return [(self.experts.gate_up_proj, None), (self.experts.down_proj, None)]
        return [(getattr(self.experts[e], n).weight, e) for e in range(self.num_experts) for n in MLP_NAMES]

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return nn.functional.silu(x)
        return nn.functional.gelu(x, approximate="tanh")

    # -- routing ----------------------------------------------------------------------------
    def register_routing_hook(self, callback: RoutingCallback) -> torch.utils.hooks.RemovableHandle:
        """Call callback(hidden [T,H], top_k_index [T,k], top_k_weights [T,k]) on every forward."""
        if self.layout == "fused":

            def pre_hook(_mod, args, kwargs):
                vals = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
                callback(vals[0], vals[1], vals[2])

            return self.experts.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return _register_gate_hook(self, callback)


class StopForward(Exception):
    """Raised by a routing hook when nothing after its layer needs computing."""


def forward_until_stopped(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Run the model on `inputs` for its hooks' sake; a hook raising StopForward ends the pass early."""
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass


def _gate_top_k(layer: MoELayer) -> tuple[nn.Module, int | None, bool]:
    gate = getattr(layer.block, "gate", None)
    if gate is None:
        raise MopeqError(f"{layer.block_path}: ModuleList MoE block has no `gate` router module")
    top_k = next((getattr(src, a) for src in (layer.block, gate) for a in ("top_k", "num_experts_per_tok")
                  if isinstance(getattr(src, a, None), int)), None)
    norm = bool(getattr(layer.block, "norm_topk_prob", getattr(gate, "norm_topk_prob", False)))
    return gate, top_k, norm


def routing_from_gate(layer: MoELayer, output, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [T, k], top_k_weights [T, k]) from what a ModuleList block's gate returned."""
    _, top_k, norm = _gate_top_k(layer)
    if isinstance(output, (tuple, list)):  # DeepSeek-style gate: (topk_idx, topk_weight, ...)
        idx = next(t for t in output if torch.is_tensor(t) and not t.is_floating_point())
        w = next(t for t in output if torch.is_tensor(t) and t.is_floating_point() and t.shape == idx.shape)
    else:  # linear gate producing logits: softmax then top-k, as the block does
        if top_k is None:
            raise MopeqError(f"{layer.block_path}: cannot tell the router's top-k (no top_k attribute)")
        probs = torch.softmax(output.reshape(-1, layer.num_experts).float(), dim=-1)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if norm:
            w = w / w.sum(-1, keepdim=True)
    return idx.reshape(tokens, -1), w.reshape(tokens, -1)


def _register_gate_hook(layer: MoELayer, callback: RoutingCallback):
    """ModuleList blocks route inside their forward; observe the gate's input and output instead."""
    gate, _, _ = _gate_top_k(layer)

    def hook(_mod, args, output):
        hidden = args[0].reshape(-1, layer.hidden_size)
        callback(hidden, *routing_from_gate(layer, output, hidden.shape[0]))

    return gate.register_forward_hook(hook)


def _layer_number(path: str) -> int:
    nums = re.findall(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)", path)
    return int(nums[-1]) if nums else -1


def _fused_layer(block_path: str, block: nn.Module, name: str, experts: nn.Module) -> MoELayer:
    gu, dn = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "has_bias", False) or not getattr(experts, "is_concatenated", True):
        raise MopeqError(f"{block_path}: experts with biases or interleaved gate/up are not supported yet")
    if getattr(experts, "has_gate", True) is False:
        raise MopeqError(f"{block_path}: experts without a gate projection are not supported yet")
    transposed = bool(getattr(experts, "is_transposed", False))
    e, a, b = gu.shape
    hidden, inter2 = (a, b) if transposed else (b, a)
    return MoELayer(
        layer=_layer_number(block_path), block_path=block_path, experts_path=f"{block_path}.{name}",
        block=block, experts=experts, layout="fused", num_experts=e, hidden_size=hidden,
        intermediate_size=inter2 // 2, activation=_activation_name(getattr(experts, "act_fn", None)),
        shared_expert_path=_shared_path(block_path, block), transposed=transposed,
    )


def _modulelist_layer(block_path: str, block: nn.Module, name: str, experts: nn.ModuleList) -> MoELayer:
    first = experts[0]
    inter, hidden = first.gate_proj.weight.shape
    for i, m in enumerate(experts):
        for n in MLP_NAMES:
            if getattr(m, n).bias is not None:
                raise MopeqError(f"{block_path}.{name}.{i}.{n} has a bias; biased experts are not supported yet")
    return MoELayer(
        layer=_layer_number(block_path), block_path=block_path, experts_path=f"{block_path}.{name}",
        block=block, experts=experts, layout="modulelist", num_experts=len(experts), hidden_size=hidden,
        intermediate_size=inter, activation=_activation_name(getattr(first, "act_fn", None)),
        shared_expert_path=_shared_path(block_path, block),
    )


def _shared_path(block_path: str, block: nn.Module) -> str | None:
    return next((f"{block_path}.{n}" for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in MLP_NAMES)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of the model, in execution (module) order. Raises if there is none."""
    layers: list[MoELayer] = []
    for path, block in model.named_modules():
        for name, child in block.named_children():
            if isinstance(getattr(child, "gate_up_proj", None), nn.Parameter) and \
                    isinstance(getattr(child, "down_proj", None), nn.Parameter) and child.gate_up_proj.dim() == 3:
                layers.append(_fused_layer(path, block, name, child))
            elif isinstance(child, nn.ModuleList) and len(child) > 1 and all(_is_gated_mlp(m) for m in child) \
                    and hasattr(block, "gate"):
                layers.append(_modulelist_layer(path, block, name, child))
    if not layers:
        raise MopeqError(
            f"{type(model).__name__} has no Mixture-of-Experts layer (no fused experts with gate_up_proj/down_proj, "
            "and no ModuleList of gate/up/down MLPs beside a router); mopeq-export only handles MoE models"
        )
    return layers


def decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers that holds the MoE blocks (its path and the list itself).

    Dense decoder layers in the same list (DeepSeek's first layers) belong to it too; vision towers do not."""
    block = find_moe_layers(model)[0].block_path.split(".")
    for cut in range(len(block) - 1, 0, -1):
        parent = ".".join(block[:cut - 1])
        mod = model.get_submodule(parent) if parent else model
        if isinstance(mod, nn.ModuleList) and block[cut - 1].isdigit():
            return parent, mod
    raise MopeqError(f"{type(model).__name__}: the MoE blocks are not inside a list of decoder layers")


def decoder_layer_paths(model: nn.Module) -> list[str]:
    path, stack = decoder_stack(model)
    return [f"{path}.{i}" for i in range(len(stack))]


def expert_index(layers: list[MoELayer]) -> dict[str, tuple[MoELayer, int]]:
    """Map every routed expert's name to (its layer, its index)."""
    return {layer.expert_name(e): (layer, e) for layer in layers for e in range(layer.num_experts)}
