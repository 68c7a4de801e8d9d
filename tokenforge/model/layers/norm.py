"""RMSNorm as Llama defines it: normalise in fp32, scale in the model's dtype.

`add_norm(x, delta)` also adds the residual before normalising (x + delta, then its norm): one
native call for fp32 on the CPU (layers/native/layer_ops.c), the same maths in torch elsewhere.
"""

import torch
from torch import nn

from tokenforge.model.layers.native import layer_ops


def runs_native(x: torch.Tensor) -> bool:
    """Whether the fused native ops take x: fp32 on the CPU, no autograd. It depends on the dtype
    and device only, never on the number of rows, so a row's result never depends on its batch."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = layer_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm); x may be updated in place. delta None adds nothing."""
        if self.ops is None or not runs_native(x) or self.weight.dtype != torch.float32:
            x = x if delta is None else x + delta
            return x, self(x)
        x = x.contiguous()
        hidden = x.shape[-1]
        if delta is not None:
            delta = delta.contiguous()
        out = torch.empty_like(x)
        self.ops.rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), x.numel() // hidden, hidden,
                          self.weight.data_ptr(), self.eps, out.data_ptr(), torch.get_num_threads())
        return x, out
