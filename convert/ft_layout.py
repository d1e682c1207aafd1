"""The FasterTransformer (FT) GPT-NeoX layout: which file holds what, in which shape, on which tensor-parallel rank.

This file is the single definition used by the exporter and by the verifier. Names and shapes follow FT's
`GptNeoXWeight.cc` / `GptNeoXDecoderLayerWeight.cc` loaders:

    model.wte.bin                              [V, E]        embedding (HF gpt_neox.embed_in)
    model.lm_head.weight.bin                   [V, E]        HF embed_out, as stored
    model.final_layernorm.{weight,bias}.bin    [E]
    model.layers.N.input_layernorm.{weight,bias}.bin            [E]
    model.layers.N.post_attention_layernorm.{weight,bias}.bin   [E]
    model.layers.N.attention.query_key_value.weight.R.bin       [E, 3, H/tp * D]   (HF: [H, 3, D] rows -> [3, H, D])
    model.layers.N.attention.query_key_value.bias.R.bin         [3, H/tp * D]
    model.layers.N.attention.dense.weight.R.bin                 [H/tp * D, E]      (Linear weights stored [in, out])
    model.layers.N.mlp.dense_h_to_4h.{weight,bias}.R.bin        [E, I/tp], [I/tp]
    model.layers.N.mlp.dense_4h_to_h.weight.R.bin               [I/tp, E]
    parallel residual:   model.layers.N.mlp.attention.bias.sum.bin  [E] = (attention.dense.bias + dense_4h_to_h.bias) / tp
                         (every rank adds it before the all-reduce, so the sum of tp copies is the real bias)
    sequential residual: model.layers.N.attention.dense.bias.bin, model.layers.N.mlp.dense_4h_to_h.bias.bin  [E], whole
                         (FT adds them once, after the all-reduce)
    model.prefix_prompt.<task>.weight.R.bin    [L, 2, H/tp, P, D]   a prefix's heads split like the attention's

E hidden size, H heads, D head size, I MLP size, V vocabulary, L layers, P prefix length, R rank.
"""
from __future__ import annotations

import configparser
import io
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..prefix.shapes import PrefixShape
from ..prefix.tasks import task_name_problem as core_task_name_problem

FT_ROTARY_BASE = 10000.0  # FT's GPT-NeoX kernels hard-code these
FT_LAYERNORM_EPS = 1e-5
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
PLACEHOLDER_PREFIX = "_removed_"  # a removed task's slot in config.ini: "_removed_<id>", prompt length 0
RENAME_HINT = ("retrain with --task NEW, or rename the file's task with `python -m prefixtune.convert retask "
               "--prefix FILE --task NEW`")

_LAYER = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")


def task_name_problem(name) -> str | None:
    """Why `name` cannot be a task of an export, or None: the project's one rule (prefix/tasks.py), plus the names
    this export keeps for removed tasks' slots."""
    problem = core_task_name_problem(name)
    if problem:
        return problem
    if name.startswith(PLACEHOLDER_PREFIX):
        return (f"task name {name!r} is reserved by the FasterTransformer export: names starting with "
                f"{PLACEHOLDER_PREFIX!r} mark removed tasks in config.ini")
    return None


def is_placeholder(name: str) -> bool:
    return name.startswith(PLACEHOLDER_PREFIX)


@dataclass(frozen=True)
class FTDims:
    """The model dimensions FT reads from config.ini: the one description used by export, verify and the layout."""

    layers: int  # L
    heads: int  # H (FT's GPT-NeoX has as many key/value heads as query heads)
    head_dim: int  # D
    inter: int  # I
    vocab: int  # V
    rotary_dim: int
    parallel_residual: bool

    @property
    def hidden(self) -> int:  # E
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> "FTDims":
        """The FT view of a GPT-NeoX config, after `check_servable`."""
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, heads=heads, head_dim=config.hidden_size // heads,
                   inter=config.intermediate_size, vocab=config.vocab_size, rotary_dim=rotary_dim(config),
                   parallel_residual=bool(config.use_parallel_residual))

    def prefix_shape(self, prefix_len: int) -> PrefixShape:
        """The shape a prefix of this model has (FT's GPT-NeoX: key/value heads = heads)."""
        return PrefixShape(num_layers=self.layers, num_kv_heads=self.heads, head_dim=self.head_dim,
                           prefix_len=prefix_len)

    def prefix_mismatches(self, shape: PrefixShape) -> list[str]:
        """Every dimension where a prefix of `shape` does not fit this model, e.g. 'num_layers: prefix has 4, model
        has 2'; empty when it fits (any prefix length fits)."""
        want = self.prefix_shape(shape.prefix_len)
        return [f"{k}: prefix has {getattr(shape, k)}, model has {getattr(want, k)}"
                for k in ("num_layers", "num_kv_heads", "head_dim") if getattr(shape, k) != getattr(want, k)]

    def as_dict(self) -> dict:
        return {**asdict(self), "hidden": self.hidden}


def rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    base = params.get("rope_theta", getattr(config, "rotary_emb_base", None))
    pct = params.get("partial_rotary_factor", getattr(config, "rotary_pct", None))
    return {"base": float(base if base is not None else 10000.0), "pct": float(pct if pct is not None else 1.0),
            "type": params.get("rope_type", "default")}


def rotary_dim(config) -> int:
    return int(config.hidden_size // config.num_attention_heads * rope(config)["pct"])


def check_servable(config, tp: int) -> list[str]:
    """Everything FT would mis-serve silently, as messages naming the setting; empty when the model is fine."""
    if getattr(config, "model_type", None) != "gpt_neox":
        return [f"model_type is {getattr(config, 'model_type', None)!r}: only GPT-NeoX models export to FT's "
                "gptneox backend"]
    if not isinstance(tp, int) or tp < 1:
        return [f"--tp {tp}: expected a tensor-parallel size >= 1 (GPUs per model instance); pass --tp 1 for one GPU"]
    problems = []
    heads = config.num_attention_heads
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over --tp {tp}: pick a divisor of {heads}")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size {config.intermediate_size} does not split over --tp {tp}")
    r = rope(config)
    if r["base"] != FT_ROTARY_BASE:
        problems.append(f"rotary base (rope_theta) is {r['base']:g}, but FT hard-codes {FT_ROTARY_BASE:g}")
    if r["type"] not in ("default", None):
        problems.append(f"rope_type {r['type']!r} is not plain rotary; FT computes only the default")
    eps = getattr(config, "layer_norm_eps", FT_LAYERNORM_EPS)
    if abs(eps - FT_LAYERNORM_EPS) > 1e-12:
        problems.append(f"layer_norm_eps is {eps:g}, but FT hard-codes {FT_LAYERNORM_EPS:g}")
    act = getattr(config, "hidden_act", "gelu")
    if not str(act).startswith("gelu"):
        problems.append(f"hidden_act is {act!r}; FT's GPT-NeoX computes GeLU")
    if getattr(config, "attention_bias", True) is False:
        problems.append("attention_bias is False; FT's GPT-NeoX always loads query_key_value biases")
    return problems


def base_files(name: str, t: torch.Tensor, d: FTDims, tp: int) -> dict[str, torch.Tensor] | None:
    """One HF tensor -> {FT file name: array} for all ranks; None for tensors FT does not load.

    The residual biases are returned under provisional names; `residual_bias_files` finishes them.
    """
    if name == "gpt_neox.embed_in.weight":
        return {"model.wte.bin": t}
    if name == "embed_out.weight":
        return {"model.lm_head.weight.bin": t}
    if name in ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"):
        return {f"model.final_layernorm.{name.rsplit('.', 1)[1]}.bin": t}
    m = _LAYER.match(name)
    if not m:
        return None
    layer, key = m.groups()
    pre = f"model.layers.{layer}."
    H, D, E = d.heads, d.head_dim, d.hidden
    if key.startswith(("input_layernorm.", "post_attention_layernorm.")):
        return {f"{pre}{key}.bin": t}
    if key == "attention.query_key_value.weight":  # HF [H*3*D, E] (out, in)
        w = t.reshape(H, 3, D, E).permute(3, 1, 0, 2)  # (E, 3, H, D)
        return {f"{pre}{key}.{r}.bin": s.reshape(E, 3, -1) for r, s in enumerate(w.chunk(tp, dim=2))}
    if key == "attention.query_key_value.bias":
        b = t.reshape(H, 3, D).permute(1, 0, 2)  # (3, H, D)
        return {f"{pre}{key}.{r}.bin": s.reshape(3, -1) for r, s in enumerate(b.chunk(tp, dim=1))}
    if key == "attention.dense.weight":  # HF [E, H*D] -> [H*D, E], rows split
        return {f"{pre}{key}.{r}.bin": s for r, s in enumerate(t.t().chunk(tp, dim=0))}
    if key == "mlp.dense_h_to_4h.weight":  # HF [I, E] -> [E, I], columns split
        return {f"{pre}{key}.{r}.bin": s for r, s in enumerate(t.t().chunk(tp, dim=1))}
    if key == "mlp.dense_h_to_4h.bias":
        return {f"{pre}{key}.{r}.bin": s for r, s in enumerate(t.chunk(tp, dim=0))}
    if key == "mlp.dense_4h_to_h.weight":  # HF [E, I] -> [I, E], rows split
        return {f"{pre}{key}.{r}.bin": s for r, s in enumerate(t.t().chunk(tp, dim=0))}
    if key in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
        return {f"{pre}{key}.bin": t}
    return None  # rotary inv_freq, masked_bias and other buffers


def residual_bias_files(layer: int, attn_bias: torch.Tensor, mlp_bias: torch.Tensor, d: FTDims, tp: int) -> dict:
    pre = f"model.layers.{layer}."
    if d.parallel_residual:
        return {f"{pre}mlp.attention.bias.sum.bin": (attn_bias.double() + mlp_bias.double()) / tp}
    return {f"{pre}attention.dense.bias.bin": attn_bias, f"{pre}mlp.dense_4h_to_h.bias.bin": mlp_bias}


def prefix_files(task: str, table: torch.Tensor, d: FTDims, tp: int) -> dict[str, torch.Tensor]:
    """A prefix table [P, L*2*H*D] -> per-rank [L, 2, H/tp, P, D] arrays."""
    P = table.shape[0]
    t = table.reshape(P, d.layers, 2, d.heads, d.head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
    return {f"model.prefix_prompt.{task}.weight.{r}.bin": s for r, s in enumerate(t.chunk(tp, dim=2))}


def expected_sizes(d: FTDims, tp: int, tasks: dict[str, int]) -> dict[str, int]:
    """Every file FT will read for this config, with its element count (`tasks`: name -> prompt length)."""
    E, I, V, L = d.hidden, d.inter, d.vocab, d.layers
    sizes = {"model.wte.bin": V * E, "model.lm_head.weight.bin": V * E, "model.final_layernorm.weight.bin": E,
             "model.final_layernorm.bias.bin": E}
    for n in range(L):
        pre = f"model.layers.{n}."
        for k in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias"):
            sizes[f"{pre}{k}.bin"] = E
        if d.parallel_residual:
            sizes[f"{pre}mlp.attention.bias.sum.bin"] = E
        else:
            sizes[f"{pre}attention.dense.bias.bin"] = E
            sizes[f"{pre}mlp.dense_4h_to_h.bias.bin"] = E
        for r in range(tp):
            sizes[f"{pre}attention.query_key_value.weight.{r}.bin"] = E * 3 * E // tp
            sizes[f"{pre}attention.query_key_value.bias.{r}.bin"] = 3 * E // tp
            sizes[f"{pre}attention.dense.weight.{r}.bin"] = E // tp * E
            sizes[f"{pre}mlp.dense_h_to_4h.weight.{r}.bin"] = E * I // tp
            sizes[f"{pre}mlp.dense_h_to_4h.bias.{r}.bin"] = I // tp
            sizes[f"{pre}mlp.dense_4h_to_h.weight.{r}.bin"] = I // tp * E
    for task, length in tasks.items():
        for r in range(tp):
            sizes[f"model.prefix_prompt.{task}.weight.{r}.bin"] = L * 2 * E // tp * length
    return sizes


def _parser() -> configparser.ConfigParser:
    # no interpolation: a '%' in a model path or name is a character, not a reference (FT's INI reader agrees)
    return configparser.ConfigParser(interpolation=None)


def config_ini(d: FTDims, *, model_name: str, start_id: int, end_id: int, dtype: str,
               tasks: list[tuple[str, int]], extra: dict | None = None) -> str:
    """`tasks`: (name, prompt length) in id order; a removed task keeps its slot as a placeholder of length 0."""
    cfg = _parser()
    cfg["gptneox"] = {
        "model_name": model_name, "head_num": str(d.heads), "size_per_head": str(d.head_dim),
        "inter_size": str(d.inter), "num_layer": str(d.layers), "rotary_embedding": str(d.rotary_dim),
        "vocab_size": str(d.vocab), "start_id": str(start_id), "end_id": str(end_id),
        "use_gptj_residual": str(int(d.parallel_residual)), "weight_data_type": dtype,
        "num_tasks": str(len(tasks)), "prompt_learning_type": "2",  # 2 = prefix prompt
    }
    for i, (name, length) in enumerate(tasks):
        cfg[f"task_{i}"] = {"task_name": name, "prompt_length": str(length)}
    if extra:
        cfg["prefixtune"] = {k: str(v) for k, v in extra.items()}
    buf = io.StringIO()
    cfg.write(buf)
    return buf.getvalue()


def read_config_ini(text: str) -> tuple[FTDims, dict, list[tuple[str, int]], dict]:
    """-> (dims, [gptneox] section, tasks in id order, [prefixtune] section). Raises KeyError/ValueError/
    configparser.Error on a malformed file (`export_dir.read_export` turns them into one message)."""
    cfg = _parser()
    cfg.read_string(text)
    g = cfg["gptneox"]
    d = FTDims(layers=int(g["num_layer"]), heads=int(g["head_num"]), head_dim=int(g["size_per_head"]),
               inter=int(g["inter_size"]), vocab=int(g["vocab_size"]), rotary_dim=int(g["rotary_embedding"]),
               parallel_residual=bool(int(g["use_gptj_residual"])))
    tasks = [(cfg[f"task_{i}"]["task_name"], int(cfg[f"task_{i}"]["prompt_length"]))
             for i in range(int(g.get("num_tasks", "0")))]
    return d, dict(g), tasks, dict(cfg["prefixtune"]) if cfg.has_section("prefixtune") else {}
