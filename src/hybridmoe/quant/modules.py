"""Packed NVFP4 weights in memory: linear layers and routed experts that keep the 4-bit checkpoint layout resident
and dequantize per matmul (inference only).

The layout is TensorRT Model Optimizer's NVFP4 export (`NVIDIA/Model-Optimizer: modelopt/torch/quantization/qtensor/
nvfp4_tensor.py`), the one vLLM reads (`vllm/model_executor/layers/quantization/modelopt.py`), per linear layer:
    weight          uint8 (out, in/2)            two E2M1 codes per byte, element 2k in the low nibble
    weight_scale    float8_e4m3fn (out, in/16)   one decode scale per block of 16 along the input dimension
    weight_scale_2  float32 ()                   the per-tensor decode scale, weight amax / (6 * 448)
    input_scale     float32 ()                   calibrated activation amax / (6 * 448)
and W = e2m1(code) * weight_scale * weight_scale_2. That is 0.5625 bytes per weight against 2 for bf16 (3.56x less).

`NVFP4Linear` holds these four tensors as buffers under exactly those names, so its state_dict is the checkpoint's.
`NVFP4Experts` holds a layer's routed experts as 3D stacks of the same tensors (`up_proj` codes (e, i, d/2),
`up_proj_weight_scale` (e, i, d/16), `up_proj_weight_scale_2` (e,), `up_proj_input_scale` (e,), likewise `down_proj`),
which `hybridmoe.checkpoint` maps to the published per-expert names (`experts.{e}.up_proj.weight`, ...). Its forward
loops over the experts that received tokens and dequantizes one expert's two matrices at a time, so the full 3D
weight never exists in a wide dtype.

The matmuls run on the dequantized weight in the activation dtype (weight-only emulation, W4A16): the results equal
those of the same model with the dequantized weights stored as ordinary weights (the tests check it bit for bit).
`input_scale` is carried for GPU FP4 GEMMs (which also quantize the activations, W4A4) and re-export; this CPU path
does not quantize activations.

The codes are decoded with `hybridmoe.quant.nvfp4` (`unpack`, `e2m1_decode`): a table of the two values of each of
the 256 bytes, built from those functions once, turns a (out, in/2) byte matrix into values with one gather; the
arithmetic after it is `nvfp4.dequantize`'s, (e2m1 * block scale) * global scale in fp32, rounded once to the dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.activations import relu_squared
from ..kernels.linear import linear, matmul_dtype
from . import nvfp4

GROUP_SIZE = 16
# The names of the tensors of one quantized linear in the checkpoint, and their dtypes.
PACKED_DTYPES = {
    "weight": torch.uint8,
    "weight_scale": torch.float8_e4m3fn,
    "weight_scale_2": torch.float32,
    "input_scale": torch.float32,
}
FP4_E2M1_MAX, FP8_E4M3_MAX = 6.0, 448.0


def packed_shapes(out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint shapes of one quantized (out, in) weight (in a multiple of 16, as the layout requires)."""
    blocks = -(-in_features // GROUP_SIZE)
    return {"weight": (out_features, blocks * GROUP_SIZE // 2), "weight_scale": (out_features, blocks),
            "weight_scale_2": (), "input_scale": ()}  # fmt: skip


_BYTE_VALUES: dict[torch.device, torch.Tensor] = {}


def _byte_values(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two signed E2M1 values each packed byte holds (low nibble first), from nvfp4.unpack."""
    table = _BYTE_VALUES.get(device)
    if table is None:
        table = nvfp4.e2m1_decode(nvfp4.unpack(torch.arange(256, dtype=torch.uint8))).view(256, 2).to(device)
        _BYTE_VALUES[device] = table
    return table


def dequantize_packed(
    codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """(out, in) weights in `dtype` from codes (out, in/2) uint8, scales (out, in/16) e4m3 and the global fp32 scale:
    e2m1 * scale * global_scale computed in fp32, then rounded once to `dtype` (as `nvfp4.dequantize`)."""
    out = codes.shape[0]
    values = _byte_values(codes.device)[codes.long()].view(out, -1, GROUP_SIZE)  # (out, blocks, 16)
    w = (values * scales.float()[..., None]) * global_scale.float()  # the first product is exact in fp32
    return w.view(out, -1)[:, :in_features].to(dtype)


class _Packed(nn.Module):
    """Keeps its packed buffers' dtypes when the model is cast (`model.to(torch.bfloat16)` moves them only), and
    refuses training: the 4-bit codes have no gradient (dequantize the model first to fine-tune it)."""

    _packed: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.pop(name) for name in self._packed if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            moved = fn(buffer)
            self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def _check_inference(self, x: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__}: packed NVFP4 weights are for inference only (no gradients reach 4-bit "
                "codes). Fix: call model.eval() / torch.no_grad(), or fine-tune the BF16 checkpoint and quantize "
                "the result again with `hybridmoe quantize`."
            )


class NVFP4Linear(_Packed):
    """A bias-free or biased linear layer whose weight stays packed (see the module docstring)."""

    _packed = tuple(PACKED_DTYPES)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name, shape in packed_shapes(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=PACKED_DTYPES[name], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, input_amax: float) -> NVFP4Linear:
        """Quantize a (out, in) weight with 1x16 blocks (nvfp4.quantize); input_scale = input_amax / 2688."""
        out, inp = weight.shape
        module = cls(inp, out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        t = nvfp4.quantize(weight.detach().float(), block="1x16")
        module.weight.copy_(t.codes)
        module.weight_scale.copy_(t.scales)
        module.weight_scale_2.copy_(t.global_scale)
        module.input_scale.fill_(input_scale(input_amax))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.weight, self.weight_scale, self.weight_scale_2, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_inference(x)
        return linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nvfp4"


class NVFP4Experts(_Packed):
    """A LatentMoE layer's routed experts with packed weights: up_proj (e, i, d) and down_proj (e, d, i) as codes,
    block scales, per-expert global scales and input scales. Same forward as `modeling.Experts` (relu^2 experts,
    `kernels.moe`'s segment arithmetic), one expert's weights dequantized at a time."""

    _packed = tuple(f"{proj}{suffix}" for proj in ("up_proj", "down_proj")
                    for suffix in ("", "_weight_scale", "_weight_scale_2", "_input_scale"))  # fmt: skip

    def __init__(self, num_experts: int, intermediate_size: int, input_size: int, device=None):
        super().__init__()
        self.num_experts, self.intermediate_size, self.input_size = num_experts, intermediate_size, input_size
        for proj, (out, inp) in (("up_proj", (intermediate_size, input_size)),
                                 ("down_proj", (input_size, intermediate_size))):  # fmt: skip
            for name, shape in packed_shapes(out, inp).items():
                buffer_name = proj if name == "weight" else f"{proj}_{name}"
                self.register_buffer(
                    buffer_name, torch.zeros((num_experts, *shape), dtype=PACKED_DTYPES[name], device=device)
                )
        self.ep_group = None  # (expert parallelism is not supported for packed experts)

    @classmethod
    def from_weights(cls, up_EID: torch.Tensor, down_EDI: torch.Tensor, input_amax: dict[str, torch.Tensor]):
        """Quantize each expert's weights (1x16 blocks); input_amax: {"up_proj": (e,), "down_proj": (e,)}."""
        e, i, d = up_EID.shape
        module = cls(e, i, d, device=up_EID.device)
        for proj, w in (("up_proj", up_EID), ("down_proj", down_EDI)):
            for expert in range(e):
                t = nvfp4.quantize(w[expert].detach().float(), block="1x16")
                getattr(module, proj)[expert].copy_(t.codes)
                getattr(module, f"{proj}_weight_scale")[expert].copy_(t.scales)
                getattr(module, f"{proj}_weight_scale_2")[expert].copy_(t.global_scale)
            getattr(module, f"{proj}_input_scale").copy_(input_scale(input_amax[proj]))
        return module

    def expert_weight(self, proj: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = getattr(self, proj)[expert]
        in_features = self.input_size if proj == "up_proj" else self.intermediate_size
        return dequantize_packed(codes, getattr(self, f"{proj}_weight_scale")[expert],
                                 getattr(self, f"{proj}_weight_scale_2")[expert], in_features, dtype)  # fmt: skip

    def forward(self, x_TD, topk_idx_TK, topk_w_TK):
        self._check_inference(x_TD)
        if self.ep_group is not None:
            raise RuntimeError("NVFP4Experts: expert parallelism is not supported for packed experts")
        t, k = topk_idx_TK.shape
        cdt = matmul_dtype(x_TD)
        flat_M = topk_idx_TK.reshape(-1)
        order_M = torch.argsort(flat_M, stable=True)
        counts = torch.bincount(flat_M, minlength=self.num_experts).tolist()
        token_M = order_M // k
        y_MD = torch.empty((t * k, self.input_size), dtype=cdt, device=x_TD.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                x = x_TD.index_select(0, token_M[rows]).to(cdt)
                u = torch.mm(x, self.expert_weight("up_proj", e, x_TD.dtype).to(cdt).T)
                y_MD[rows] = torch.mm(relu_squared(u), self.expert_weight("down_proj", e, x_TD.dtype).to(cdt).T)
                start += n
        w_M = topk_w_TK.reshape(-1).index_select(0, order_M)
        out_TD = torch.zeros((t, self.input_size), dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_M, y_MD.to(x_TD.dtype).float() * w_M.float()[:, None])
        return out_TD.to(x_TD.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, intermediate={self.intermediate_size}, input={self.input_size}, nvfp4"


def input_scale(amax) -> torch.Tensor:
    """The decode scale of an activation with this amax: amax / (6 * 448), fp32 (1 / 2688 for an amax of 0)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax, torch.ones_like(amax)) / (FP4_E2M1_MAX * FP8_E4M3_MAX)


def packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's NVFP4Linear and NVFP4Experts modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (NVFP4Linear, NVFP4Experts))}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of the model's parameters and buffers: all, and those of the packed (quantized) modules."""
    packed = packed_modules(model)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    quantized = sum(b.numel() * b.element_size() for m in packed.values() for b in m.buffers())
    return {"total": total, "quantized": quantized}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every packed module by an ordinary one holding its dequantized weights (in `dtype`, default the
    model's lm_head dtype), in place: the model can then be trained or saved in BF16. Returns the model."""
    from ..kernels.linear import Linear
    from ..modeling import Experts

    dtype = dtype or model.lm_head.weight.dtype
    for name, m in packed_modules(model).items():
        if isinstance(m, NVFP4Linear):
            new = Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=dtype)
            with torch.no_grad():
                new.weight.copy_(m.dequantized_weight(dtype))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
        else:
            with torch.device("meta"):
                new = Experts(model.config)
            for proj in ("up_proj", "down_proj"):
                w = torch.stack([m.expert_weight(proj, e, dtype) for e in range(m.num_experts)])
                setattr(new, proj, nn.Parameter(w))
        replace_module(model, name, new)
    model.config.extra.pop("quantization_config", None)
    return model
