"""Next-token loss through a frozen output layer, a few rows at a time.

The vocabulary is large (SmolLM2: 49,152), so the plain route -- logits, an fp32 copy, log-softmax, and in backward
their gradients -- holds four (N, V) fp32-sized tensors at once: 370 MiB for 494 labelled tokens, the largest piece
of a training step's memory. The output layer is frozen, so its weight needs no gradient, and the gradient of the
loss with respect to the hidden states can be computed in the forward pass, chunk by chunk: only an (N, E) gradient
is kept, and one (chunk, V) block of logits lives at a time. Larger chunks read the (V, E) weight fewer times (at
85 rows of SmolLM2 its two products run at 480-680 GFLOPS, at 170 rows 600-760); 32 MiB is 113 rows in bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 32 << 20  # one chunk's working set: its logits in the model's dtype plus their fp32 log-softmax


def chunk_row_bytes(vocab: int, itemsize: int) -> int:
    """Bytes one row of a chunk takes: fp32 log-probabilities, plus the logits where the model is narrower."""
    return vocab * (4 + (itemsize if itemsize != 4 else 0))


def chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk for `n_rows` labelled tokens: as many as CHUNK_BYTES holds, at least one."""
    return max(1, min(n_rows, CHUNK_BYTES // chunk_row_bytes(vocab, itemsize)))


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight^T, targets), for a weight that takes no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        # hidden (N, E); weight (V, E); targets (N,)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        narrow = hidden.dtype != torch.float32
        rows = chunk_rows(n_rows, vocab, hidden.element_size())
        # One set of buffers for every chunk: a multi-MiB tensor allocated per chunk can be a fresh mapping each time,
        # whose page faults cost as much as the log-softmax itself.
        logits_buf = hidden.new_empty((rows, vocab))  # (rows, V) in the model's dtype; later the gradient
        log_probs_buf = torch.empty((rows, vocab), device=hidden.device) if narrow else logits_buf  # fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None  # d(sum loss)/d hidden, (N, E)
        row = torch.arange(rows, device=hidden.device)
        for start in range(0, n_rows, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows, None]  # (n, E), (n, 1)
            logits = torch.mm(h, weight.t(), out=logits_buf[:len(h)])  # (n, V), as the plain route computes them
            log_probs = log_probs_buf[:len(h)]
            if narrow:
                log_probs.copy_(logits)
            torch.log_softmax(log_probs, dim=-1, out=log_probs)  # in place, fp32 as F.cross_entropy(x.float())
            total -= log_probs.gather(1, t).sum()
            if grad is not None:
                # d loss / d logits = softmax - one_hot(target), computed in fp32 and rounded once
                probs = log_probs.exp_()
                target_grad = probs.gather(1, t) - 1
                if narrow:
                    probs = logits.copy_(probs)
                # indexing, not scatter_: on a bf16 CPU chunk of 113 x 49,152 scatter_ takes 1.9 ms, indexing 4 us
                probs[row[:len(h)], t[:, 0]] = target_grad[:, 0].to(probs.dtype)
                torch.mm(probs, weight, out=grad[start:start + len(h)])
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
