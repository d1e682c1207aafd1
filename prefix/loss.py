"""Next-token loss through a frozen output layer, a few rows at a time.

The vocabulary is large (SmolLM2: 49,152), so the plain route -- logits, an fp32 copy, log-softmax, and in backward
their gradients -- holds four (N, V) fp32-sized tensors at once: 370 MiB for 494 labelled tokens, the largest piece
of a training step's memory. The output layer is frozen, so its weight needs no gradient, and the gradient of the
loss with respect to the hidden states can be computed in the forward pass, chunk by chunk: only an (N, E) gradient
is kept, and one (chunk, V) block of logits lives at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_VALUES = 1 << 22  # logits per chunk (16 MiB in fp32): the rows per chunk are CHUNK_VALUES // V


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight^T, targets), for a weight that takes no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        # hidden (N, E); weight (V, E); targets (N,)
        rows = max(1, CHUNK_VALUES // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None  # d(sum loss)/d hidden, (N, E)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = h @ weight.t()  # (n, V) in the model's dtype, as the plain route computes them
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (n, V)
            total -= log_probs.gather(1, t[:, None]).sum()
            if grad is not None:
                # d loss / d logits = softmax - one_hot(target), in the log-probabilities' memory
                probs = log_probs.exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1
                grad[start:start + rows] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def frozen_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of `hidden` (N, E) against `targets` (N,) through the output layer `head`.

    The chunked route needs a plain frozen nn.Linear without bias (every model prefixtune trains: tied or untied
    embeddings); anything else (a bias, a quantized weight, a head that trains, a weight ZeRO-3 partitions) takes
    the plain route."""
    weight = getattr(head, "weight", None)
    plain_linear = (type(head) is nn.Linear and head.bias is None and type(weight) is nn.Parameter
                    and not weight.requires_grad and not hasattr(weight, "ds_id"))  # ZeRO-3 gathers it in head()
    if not plain_linear:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return FrozenHeadCrossEntropy.apply(hidden, weight, targets)
