"""How much the model's loss cares about each output channel of each linear layer.

The planner predicts a layer's cost of quantization as the Hessian-weighted output error
tr((W−Ŵ) H (W−Ŵ)ᵀ): the squared error of the layer's outputs. Output errors of different layers
are not worth the same: an error in a channel whose gradient is large moves the loss more. With the
empirical Fisher of the loss with respect to a layer's outputs y, approximated as diagonal,

    ΔL ≈ ½ Σ_o g_o · ((W−Ŵ) H (W−Ŵ)ᵀ)_oo,   g_o = mean over tokens of (∂L/∂y_o)²,

so per-output-channel weights g make the predicted errors of different layers comparable (in units
of loss) before they are added up by the knapsack. One forward and backward pass over a few
calibration sequences gives g for every layer at once; no parameter gradient is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def output_gradient_moments(model: nn.Module, linears: dict[str, nn.Module], tokens: torch.Tensor,
                            batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the summed next-token loss w.r.t. each output channel of ``linears``.

    ``tokens``: (samples, seq_len) ids. Returns name → float32 tensor of shape (out_features,).
    """
    embed = model.get_input_embeddings()
    sums = {name: torch.zeros(module.out_features) for name, module in linears.items()}
    count = 0
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in linears.items()]
    try:
        for start in range(0, len(tokens), batch_size):
            ids = tokens[start : start + batch_size]
            with torch.enable_grad():
                inputs = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                names = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    sums[name] += grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0)
            count += ids.numel()
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(count, 1) for name, total in sums.items()}
