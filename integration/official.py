"""The official DisCa release (Tencent-Hunyuan/DisCa, HunyuanVideo 1.0 T2V 540p) -> this project's exports.

    python -m integration convert-official --dit hyvideo10_t2v_restricted_meanflow_540p.safetensors \
        --predictor hyvideo10_t2v_predictor_540p.safetensors --out official [--transformer_config config.json]

writes `official/restricted_meanflow` (a `models.io` export: `load_backbone` loads it; stage 3 and
evaluate.py take it) and `official/predictor` (a `models.predictor` export: `load_predictor`).

Key layouts (SPEC §9.4; the original HunyuanVideo names as listed in diffusers'
scripts/convert_hunyuan_video_to_diffusers.py, huggingface/diffusers):
- DiT: `img_in`, `txt_in.{input_embedder, t_embedder.mlp.{0,2}, c_embedder.linear_{1,2},
  individual_token_refiner.blocks.i.{norm1, self_attn_qkv, self_attn_proj, norm2, mlp.fc{1,2}, adaLN_modulation.1}}`,
  `time_in.mlp.{0,2}`, `vector_in.{in,out}_layer`, `guidance_in.mlp.{0,2}`, `double_blocks.i.{img,txt}_{mod.linear,
  attn_qkv, attn_{q,k}_norm, attn_proj, mlp.fc{1,2}}`, `single_blocks.j.{linear1, linear2, q_norm, k_norm,
  modulation.linear}`, `final_layer.{linear, adaLN_modulation.1}` plus DisCa's r embedder `time_r_in.mlp.{0,2}`.
  Fused rows: `*_qkv` = q, k, v; `linear1` = q, k, v, MLP-in; `final_layer.adaLN_modulation.1` is (shift, scale)
  where diffusers' `norm_out.linear` is (scale, shift).
- Predictor: `fusion_mlp.{0,2}`, `mm_single_blocks.{0,1}.{linear1, linear2, q_norm, k_norm, modulation.linear}`.

Both directions come from one table built from the target model's own state dict (on the meta device: the
13B model is never materialised), so every official key is accounted for: an unknown or a missing key,
or a shape that does not fit the HunyuanVideo 1.0 architecture, fails naming the key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from models.io import (CONFIG_NAME, WEIGHTS_NAME, atomic_write, atomic_write_json, check_export_target,
                       replace_directory)

DIT_FILE = "hyvideo10_t2v_restricted_meanflow_540p.safetensors"
PREDICTOR_FILE = "hyvideo10_t2v_predictor_540p.safetensors"
OFFICIAL_R_EMBED = "average"  # HunyuanVideo 1.0: (time_in(t) + time_r_in(r)) / 2 (SPEC §3)

_SINGLE = [  # a HunyuanVideo single-stream block: (our suffix, official suffix, part, parts)
    (r"attn\.to_q", "linear1", 0, 4), (r"attn\.to_k", "linear1", 1, 4), (r"attn\.to_v", "linear1", 2, 4),
    (r"proj_mlp", "linear1", 3, 4), (r"proj_out", "linear2", 0, 1), (r"attn\.norm_q", "q_norm", 0, 1),
    (r"attn\.norm_k", "k_norm", 0, 1), (r"norm\.linear", "modulation.linear", 0, 1),
]
_DOUBLE = [
    (r"norm1\.linear", "img_mod.linear", 0, 1), (r"norm1_context\.linear", "txt_mod.linear", 0, 1),
    (r"attn\.to_q", "img_attn_qkv", 0, 3), (r"attn\.to_k", "img_attn_qkv", 1, 3), (r"attn\.to_v", "img_attn_qkv", 2, 3),
    (r"attn\.norm_q", "img_attn_q_norm", 0, 1), (r"attn\.norm_k", "img_attn_k_norm", 0, 1),
    (r"attn\.to_out\.0", "img_attn_proj", 0, 1),
    (r"attn\.add_q_proj", "txt_attn_qkv", 0, 3), (r"attn\.add_k_proj", "txt_attn_qkv", 1, 3),
    (r"attn\.add_v_proj", "txt_attn_qkv", 2, 3), (r"attn\.norm_added_q", "txt_attn_q_norm", 0, 1),
    (r"attn\.norm_added_k", "txt_attn_k_norm", 0, 1), (r"attn\.to_add_out", "txt_attn_proj", 0, 1),
    (r"ff\.net\.0\.proj", "img_mlp.fc1", 0, 1), (r"ff\.net\.2", "img_mlp.fc2", 0, 1),
    (r"ff_context\.net\.0\.proj", "txt_mlp.fc1", 0, 1), (r"ff_context\.net\.2", "txt_mlp.fc2", 0, 1),
]
_REFINER = [
    (r"norm1", "norm1", 0, 1), (r"attn\.to_q", "self_attn_qkv", 0, 3), (r"attn\.to_k", "self_attn_qkv", 1, 3),
    (r"attn\.to_v", "self_attn_qkv", 2, 3), (r"attn\.to_out\.0", "self_attn_proj", 0, 1), (r"norm2", "norm2", 0, 1),
    (r"ff\.net\.0\.proj", "mlp.fc1", 0, 1), (r"ff\.net\.2", "mlp.fc2", 0, 1),
    (r"norm_out\.linear", "adaLN_modulation.1", 0, 1),
]
_DIT_FLAT = [
    ("model.x_embedder.proj", "img_in.proj"),
    ("model.context_embedder.proj_in", "txt_in.input_embedder"),
    ("model.context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
    ("model.context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
    ("model.context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
    ("model.context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
    ("model.time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("model.time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("model.time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
    ("model.time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
    ("model.time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("model.time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("model.proj_out", "final_layer.linear"),
    ("model.norm_out.linear", "final_layer.adaLN_modulation.1"),  # halves swapped
    ("time_r_in.linear_1", "time_r_in.mlp.0"),
    ("time_r_in.linear_2", "time_r_in.mlp.2"),
]
_SWAPPED = {"final_layer.adaLN_modulation.1"}


@dataclass(frozen=True)
class Slot:
    """Where one of our tensors lives in the official checkpoint: rows `part` of `parts` of `key`."""

    key: str
    part: int = 0
    parts: int = 1


def _block_rule(rest: str, rules, prefix: str) -> Slot | None:
    for pattern, official, part, parts in rules:
        m = re.fullmatch(pattern + r"\.(weight|bias)", rest)
        if m:
            return Slot(f"{prefix}.{official}.{m.group(1)}", part, parts)
    return None


def dit_slot(key: str) -> Slot | None:
    """The official DiT slot of one of our HunyuanVideo backbone keys (None: no rule)."""
    for ours, official in _DIT_FLAT:
        if key.startswith(ours + "."):
            return Slot(official + key[len(ours):])
    for pattern, rules, prefix in (
        (r"model\.transformer_blocks\.(\d+)\.(.+)", _DOUBLE, "double_blocks.{}"),
        (r"model\.single_transformer_blocks\.(\d+)\.(.+)", _SINGLE, "single_blocks.{}"),
        (r"model\.context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)", _REFINER,
         "txt_in.individual_token_refiner.blocks.{}"),
    ):
        m = re.fullmatch(pattern, key)
        if m:
            return _block_rule(m.group(2), rules, prefix.format(m.group(1)))
    return None


def predictor_slot(key: str) -> Slot | None:
    """The official predictor slot of one of our `Predictor` keys (official design: full width, no cache residual)."""
    m = re.fullmatch(r"fusion\.(0|2)\.(weight|bias)", key)
    if m:
        return Slot(f"fusion_mlp.{m.group(1)}.{m.group(2)}")
    m = re.fullmatch(r"blocks\.(\d+)\.block\.(.+)", key)
    if m:
        return _block_rule(m.group(2), _SINGLE, f"mm_single_blocks.{m.group(1)}")
    return None


def layout(template: dict[str, Tensor], slot_of) -> dict[str, list[tuple[str, int]]]:
    """official key -> [(our key, rows)] in part order, from a template state dict (meta tensors are fine)."""
    groups: dict[str, dict[int, tuple[str, int]]] = {}
    for key, value in template.items():
        slot = slot_of(key)
        if slot is None:
            raise KeyError(f"no official name for parameter {key!r}: the converter does not know this layout")
        groups.setdefault(slot.key, {})[slot.part] = (key, value.shape[0])
    return {k: [parts[i] for i in sorted(parts)] for k, parts in groups.items()}


def _swapped(official_key: str) -> bool:
    return official_key.rsplit(".", 1)[0] in _SWAPPED


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_official(state: dict[str, Tensor], slot_of) -> dict[str, Tensor]:
    """Our state dict -> official names (fused rows concatenated)."""
    out = {}
    for official, parts in layout(state, slot_of).items():
        t = torch.cat([state[k] for k, _ in parts], dim=0)
        out[official] = _swap_halves(t) if _swapped(official) else t
    return out


def from_official(official: dict[str, Tensor], template: dict[str, Tensor], slot_of, source: str) -> dict[str, Tensor]:
    """Official names -> our state dict, checked strictly against `template` (names and shapes)."""
    table = layout(template, slot_of)
    unknown = sorted(set(official) - set(table))
    missing = sorted(set(table) - set(official))
    if unknown or missing:
        raise ValueError(f"{source}: " + "; ".join(filter(None, [
            f"unknown key(s) {unknown[:5]}" if unknown else "", f"missing key(s) {missing[:5]}" if missing else ""]))
            + " (expected the official HunyuanVideo 1.0 DisCa layout)")
    out = {}
    for key, parts in table.items():
        t = official[key]
        rows = sum(n for _, n in parts)
        want = (rows, *template[parts[0][0]].shape[1:])
        if tuple(t.shape) != want:
            raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, the HunyuanVideo 1.0 T2V architecture "
                             f"expects {want}: is this checkpoint from another model or size?")
        t = _swap_halves(t) if _swapped(key) else t
        for (ours, _), piece in zip(parts, t.split([n for _, n in parts], dim=0)):
            out[ours] = piece.contiguous()
    return out


def read_official(path: str | Path, kind: str) -> dict[str, Tensor]:
    """An official safetensors file with the release loader's prefixes stripped; refuses the other kind."""
    path = Path(path)
    if not path.is_file():
        expected = DIT_FILE if kind == "dit" else PREDICTOR_FILE
        raise FileNotFoundError(f"official {kind} checkpoint {path} not found (expected {expected})")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are read (nothing is unpickled)")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable safetensors file ({err}); "
                         f"download the official {kind} checkpoint again") from err
    for p in ("module.", "predictor."):  # the release loader's wrappers
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    is_pred = any(k.startswith("fusion_mlp.") for k in state)
    is_dit = any(k.startswith("double_blocks.") for k in state)
    if kind == "dit" and not is_dit:
        what = "a predictor checkpoint" if is_pred else "not a HunyuanVideo DiT (no double_blocks.* keys)"
        raise ValueError(f"{path} is {what}; --dit expects the Restricted MeanFlow DiT ({DIT_FILE})")
    if kind == "predictor" and not is_pred:
        what = "a DiT checkpoint" if is_dit else "not a DisCa predictor (no fusion_mlp.* keys)"
        raise ValueError(f"{path} is {what}; --predictor expects {PREDICTOR_FILE}")
    if kind == "predictor" and any(".img_attn_qkv" in k or k.startswith("mm_double_blocks.") for k in state):
        raise ValueError(f"{path} is a HunyuanVideo 1.5 predictor (double-stream blocks); this converter reads the "
                         "1.0 T2V release (build a Predictor(variant='hunyuan_video_1_5') for 1.5)")
    return state


def hunyuan10_config(transformer_config: str | Path | None = None) -> dict:
    """The backbone config of the official stage-2 model: HunyuanVideo 1.0 (diffusers' defaults, or a
    transformer config.json), its guidance embedder, and the 'average' r embedder."""
    if transformer_config is None:
        import inspect

        from diffusers import HunyuanVideoTransformer3DModel

        params = inspect.signature(HunyuanVideoTransformer3DModel.__init__).parameters
        dcfg = {k: p.default for k, p in params.items() if k != "self"}  # diffusers' defaults = HunyuanVideo 1.0
    else:
        dcfg = json.loads(Path(transformer_config).read_text())
    dcfg = {k: v for k, v in dcfg.items() if not str(k).startswith("_") and k != "disca"}
    if not dcfg.get("guidance_embeds", True):
        raise ValueError("the official DisCa HunyuanVideo 1.0 model has a guidance embedder; the given transformer "
                         "config has guidance_embeds=false")
    return {"type": "hunyuan_video", "diffusers_config": json.loads(json.dumps(dcfg, default=list)),
            "guidance_embed": True, "r_embed": OFFICIAL_R_EMBED, "attention_backend": "sdpa"}


def _meta_backbone(config: dict) -> nn.Module:
    from models.io import build_backbone

    with torch.device("meta"):
        return build_backbone(config)


def _write_export(directory: Path, state: dict[str, Tensor], config: dict) -> Path:
    def write(tmp: Path) -> None:
        atomic_write(tmp / WEIGHTS_NAME, save({k: v.contiguous() for k, v in state.items()}))
        atomic_write_json(tmp / CONFIG_NAME, config)

    return replace_directory(directory, write)


def is_export_dir(directory: Path) -> bool:
    """A models.io export written by this converter, and nothing else: config.json (+ model.safetensors)."""
    names = {p.name for p in Path(directory).iterdir()}
    return CONFIG_NAME in names and names <= {CONFIG_NAME, WEIGHTS_NAME}


def convert_official(out: str | Path, dit: str | Path | None = None, predictor: str | Path | None = None,
                     transformer_config: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Convert the official files into `out/restricted_meanflow` and `out/predictor`. Both are checked before
    anything is written; an existing output directory is replaced only when it is a previous export
    of the converter and `overwrite` is set, never when it holds (or is inside) an input file."""
    from models.predictor import PREDICTOR_TYPE, Predictor, canonical_config

    if dit is None and predictor is None:
        raise ValueError("give --dit and/or --predictor")
    sources = tuple(s for s in (dit, predictor, transformer_config) if s is not None)
    for name, given in (("restricted_meanflow", dit), ("predictor", predictor)):
        if given is not None:
            check_export_target(Path(out) / name, kind="converted export (convert-official)", sources=sources,
                                is_same_kind=is_export_dir, overwrite=overwrite,
                                label=f"{Path(out) / name} (the {name} export under --out)")
    backbone = _meta_backbone(hunyuan10_config(transformer_config))
    config = backbone.config  # complete: every diffusers default filled in
    jobs = []
    if dit is not None:
        state = from_official(read_official(dit, "dit"), backbone.state_dict(), dit_slot, str(dit))
        jobs.append(("restricted_meanflow", state, config))
    if predictor is not None:
        with torch.device("meta"):
            pred = Predictor(backbone)
        state = from_official(read_official(predictor, "predictor"), pred.state_dict(), predictor_slot, str(predictor))
        jobs.append(("predictor", state, {"type": PREDICTOR_TYPE, "predictor": pred.config,
                                          "backbone": canonical_config(config)}))
    out = Path(out)
    return {name: _write_export(out / name, state, cfg) for name, state, cfg in jobs}
