"""A frozen base language model plus a trainable prefix encoder.

Real tokens sit at positions P, P+1, ... (the FasterTransformer convention), in training and at inference, for
left- or right-padded batches. The prefix reaches every layer through `prefix.attention`, so it survives
gradient checkpointing.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import ATTN_NAME, use_prefix_attention
from .encoder import PrefixEncoder
from .lean import lighten
from .loss import frozen_head_loss


def is_trainable(name: str) -> bool:
    """The one predicate that decides what trains, what the optimizer sees and what a training state saves."""
    return name.startswith("encoder.")


def prefix_positions(attention_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(B, T) mask -> (B, T) position ids: the first real token of every row sits at P, padding ignored."""
    return prefix_len + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefix_hidden_states(base, input_ids, attention_mask, table):
    """(B, T) ids -> (B, T, E) last hidden states of `base` with the prefix `table` ([P, width] or [B, P, width])."""
    if base.config._attn_implementation != ATTN_NAME:
        use_prefix_attention(base)
    out = base.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=prefix_positions(attention_mask, table.shape[-2]),
        prefix_table=table,
        use_cache=False,
    )
    return out.last_hidden_state


def _no_dropout(base: nn.Module) -> None:
    """Zero every dropout probability of the frozen base. Eval mode alone is not enough: a checkpointed decoder layer
    must be in training mode, and some (OPT, Falcon) call F.dropout(..., training=self.training) themselves."""
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in vars(m).items():
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)


class PrefixLM(nn.Module):
    def __init__(self, base: nn.Module, encoder: PrefixEncoder):
        super().__init__()
        self.base = base
        self.encoder = encoder
        self.checkpointing = False
        _no_dropout(base)
        lighten(base)
        use_prefix_attention(base)
        base.config.use_cache = False
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    def train(self, mode: bool = True):
        """Only the encoder follows train/eval mode: the frozen base always runs as in inference (GPT-2's dropout
        of 0.1 would otherwise make training and dev losses come from different models)."""
        super().train(mode)
        self.base.eval()
        if mode and self.checkpointing:
            # HF checkpoints a decoder layer only while that layer is in training mode; set the flag on the layer
            # module alone, so its dropout children stay off.
            from transformers.modeling_layers import GradientCheckpointingLayer

            for m in self.base.modules():
                if isinstance(m, GradientCheckpointingLayer):
                    m.training = True
        return self

    def gradient_checkpointing(self, enable: bool = True) -> None:
        self.checkpointing = enable
        if enable:
            # Non-reentrant: the prefix table arrives as a keyword argument and still receives its gradient.
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.base.activation_checkpointing_disable()
        self.train(self.training)

    def hidden_states(self, input_ids, attention_mask, table=None):
        """(B, T) ids -> (B, T, E) last hidden states, with the prefix `table` (defaults to the encoder's)."""
        return prefix_hidden_states(self.base, input_ids, attention_mask, self.encoder() if table is None else table)

    def forward(self, input_ids, attention_mask, labels):
        """Mean next-token loss over labelled tokens, and their count (for token-weighted averages)."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, E)
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != -100
        # Only labelled positions reach the (large) output layer: prompts and padding cost nothing there.
        n_tokens = keep.sum()
        loss = frozen_head_loss(self.base.get_output_embeddings(), hidden[:, :-1][keep], targets[keep])  # (N, E) in
        return loss / n_tokens.clamp(min=1), n_tokens
