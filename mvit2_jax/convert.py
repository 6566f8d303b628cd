"""Convert official MobileViTv2 checkpoints into mvit2_jax model directories.

    python -m mvit2_jax.convert SRC DST [--image-size N] [--output-stride N] [--aspp-rates A B C] [--weights ema|raw]

SRC is a state dict in one of five namings, told apart by its keys:
- ml-cvnets classification (``.pt``; ``conv_1.block.conv.weight``, ``layer_3.1.global_rep.0...``),
  MobileViTv2 or MobileViTv1 (``conv_1x1_exp.*``, ``global_rep.N.pre_norm_mha.*``);
- timm classification (``.safetensors``, ``.pth``, ``.bin``; ``stem.conv.weight``, ``stages.2.1...``),
  ``mobilevitv2_*`` or ``mobilevit_{xxs,xs,s}`` (``final_conv.*``, ``conv_fusion.*``), whose
  fused ``attn.qkv`` is split into the multi-head unit's query, key and value;
- ml-cvnets segmentation (``encoder.*`` and ``seg_head.*``: DeepLabv3 or PSPNet, with or
  without the aux head);
- HF transformers (``mobilevitv2.*`` with ``classifier.*`` or ``segmentation_head.*``:
  MobileViTV2ForImageClassification / MobileViTV2ForSemanticSegmentation);
- ml-cvnets detection (``encoder.*``, ``extra_layers.*`` and ``ssd_heads.*``: SSDLite; the
  class count and the projection widths are read from the heads, the image size defaults to
  the official 320x320).
Any of them may come inside a cvnets training checkpoint (``training_checkpoint_last.pt``:
``model_state_dict``, ``ema_state_dict``, ``optim_state_dict``, ...): its EMA weights are
converted unless ``--weights raw`` (a run without EMA gives its raw weights), and DST records
which. A file in a layout this converter does not know is refused with its top-level keys listed.
The width multiplier, the number of classes and the head are read from the weights. What the
weights cannot tell a segmentation model (its output stride and ASPP rates) comes from the
flags, else from the HF ``config.json`` beside SRC, else from the official recipe of the
dataset its class count implies (150: ADE20k, output stride 8, rates 12/24/36; 21: PASCAL VOC,
16, 6/12/18; any other count: the official code's defaults, 16 and 6/12/18); it is recorded in
DST. DST is a new (or empty) directory; load it with ``mvit2_jax.load_model(DST)``.

HF transformers' own MobileViTV2 differs from the official model in segmentation: it does not
dilate the MobileViTv2 blocks' local 3x3 conv, so the two agree only at output stride 32. The
converted model follows the official code; its results match HF's where HF's model agrees.

``.safetensors`` files load with numpy alone. ``.pt``/``.pth``/``.bin`` files need PyTorch
(``pip install "mvit2_jax[convert]"``) and are read with ``weights_only=True``: a pickle that
would run code is refused.

Conversion goes in two steps: backbone names are renamed to timm names (`CVNETS_TO_TIMM`,
`HF_TO_TIMM`) and segmentation- and SSD-head names to the model's module names
(`SEG_HEAD_RULES`, `DETECTION_RULES`),
then every name maps onto one Flax variable through one two-way table (`TIMM_FLAX_MODULES`,
`TIMM_FLAX_LEAVES`), whose module names mirror timm's:
``stages.2.1.transformer.0.mlp.fc1.weight`` <-> params/stages_2_1/transformer_0/fc1/kernel.

Errors in the input (a file that is missing, unreadable, refused or does not match the
architecture) are DataErrors; the command prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
from flax import traverse_util

from mvit2_jax.checkpoint import abstract_variables, read_config, save_model
from mvit2_jax.errors import ConfigError, DataError, usage_errors_exit
from mvit2_jax.models.mobilevitv2 import OUTPUT_STRIDES, VARIANTS, MobileViTv2, Widths, widths_for
from mvit2_jax.models import anchors as anchor_lib
from mvit2_jax.models.detection import MobileViTv2SSD
from mvit2_jax.models.mobilevit import V1_VARIANTS, MobileViT
from mvit2_jax.models.segmentation import MobileViTv2Segmentation

StateDict = Dict[str, np.ndarray]
Path = Tuple[str, ...]  # (collection, module, ..., leaf), e.g. ("params", "stem", "conv", "kernel")

STANDARD_ALPHAS = tuple(VARIANTS)
INSTALL_HINT = 'pip install "mvit2_jax[convert]"'

# cvnets name -> timm name, applied in order to every key (reference section 5; cvnets
# layer i is timm stage i - 1). A replacement is a regex template or a function of the match.
CVNETS_TO_TIMM: Tuple[Tuple[str, Union[str, Callable[[re.Match], str]]], ...] = (
    (r"^conv_1\.block\.conv\.", "stem.conv."),
    (r"^conv_1\.block\.norm\.", "stem.bn."),
    (r"^layer_(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.block\.exp_1x1\.block\.conv\.", ".conv1_1x1.conv."),
    (r"\.block\.exp_1x1\.block\.norm\.", ".conv1_1x1.bn."),
    (r"\.block\.conv_3x3\.block\.conv\.", ".conv2_kxk.conv."),
    (r"\.block\.conv_3x3\.block\.norm\.", ".conv2_kxk.bn."),
    (r"\.block\.red_1x1\.block\.conv\.", ".conv3_1x1.conv."),
    (r"\.block\.red_1x1\.block\.norm\.", ".conv3_1x1.bn."),
    (r"\.local_rep\.0\.block\.conv\.", ".conv_kxk.conv."),
    (r"\.local_rep\.0\.block\.norm\.", ".conv_kxk.bn."),
    (r"\.local_rep\.1\.block\.conv\.", ".conv_1x1."),
    (r"\.global_rep\.(\d+)\.pre_norm_attn\.0\.", r".transformer.\1.norm1."),
    (r"\.global_rep\.(\d+)\.pre_norm_attn\.1\.(qkv_proj|out_proj)\.block\.conv\.", r".transformer.\1.attn.\2."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.0\.", r".transformer.\1.norm2."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.1\.block\.conv\.", r".transformer.\1.mlp.fc1."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.3\.block\.conv\.", r".transformer.\1.mlp.fc2."),
    (r"\.global_rep\.\d+\.(weight|bias)$", r".norm.\1"),  # the GroupNorm after the last layer
    (r"\.conv_proj\.block\.conv\.", ".conv_proj.conv."),
    (r"\.conv_proj\.block\.norm\.", ".conv_proj.bn."),
    (r"^classifier\.1\.", "head.fc."),
)
_CVNETS_RULES = tuple((re.compile(p), r) for p, r in CVNETS_TO_TIMM)


def _conv_bn(m: re.Match) -> str:
    return "conv." if m.group(m.lastindex) == "conv" else "bn."


# cvnets MobileViTv1 name -> timm name (a v1 checkpoint is told by its "conv_1x1_exp." keys).
CVNETS_V1_TO_TIMM: Tuple[Tuple[str, Union[str, Callable[[re.Match], str]]], ...] = (
    (r"^conv_1\.block\.(conv|norm)\.", lambda m: "stem." + _conv_bn(m)),
    (r"^conv_1x1_exp\.block\.(conv|norm)\.", lambda m: "final_conv." + _conv_bn(m)),
    (r"^layer_(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.block\.exp_1x1\.block\.(conv|norm)\.", lambda m: ".conv1_1x1." + _conv_bn(m)),
    (r"\.block\.conv_3x3\.block\.(conv|norm)\.", lambda m: ".conv2_kxk." + _conv_bn(m)),
    (r"\.block\.red_1x1\.block\.(conv|norm)\.", lambda m: ".conv3_1x1." + _conv_bn(m)),
    (r"\.local_rep\.conv_3x3\.block\.(conv|norm)\.", lambda m: ".conv_kxk." + _conv_bn(m)),
    (r"\.local_rep\.conv_1x1\.block\.conv\.", ".conv_1x1."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.0\.", r".transformer.\1.norm1."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.", r".transformer.\1.attn.qkv."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.1\.out_proj\.", r".transformer.\1.attn.proj."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.0\.", r".transformer.\1.norm2."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.1\.", r".transformer.\1.mlp.fc1."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.4\.", r".transformer.\1.mlp.fc2."),
    (r"\.global_rep\.\d+\.(weight|bias)$", r".norm.\1"),  # the LayerNorm after the last layer
    (r"\.conv_proj\.block\.(conv|norm)\.", lambda m: ".conv_proj." + _conv_bn(m)),
    (r"\.fusion\.block\.(conv|norm)\.", lambda m: ".conv_fusion." + _conv_bn(m)),
    (r"^classifier\.fc\.", "head.fc."),
)
_CVNETS_V1_RULES = tuple((re.compile(p), r) for p, r in CVNETS_V1_TO_TIMM)
_CVNETS_V1_MARK = "conv_1x1_exp."

# HF transformers backbone name -> timm name (the "mobilevitv2." prefix removed first).
HF_TO_TIMM: Tuple[Tuple[str, str], ...] = (
    (r"^conv_stem\.convolution\.", "stem.conv."),
    (r"^conv_stem\.normalization\.", "stem.bn."),
    (r"^encoder\.layer\.([01])\.layer\.(\d+)\.", r"stages.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.downsampling_layer\.", r"stages.\1.0."),
    (r"^encoder\.layer\.(\d+)\.", r"stages.\1.1."),
    (r"\.expand_1x1\.convolution\.", ".conv1_1x1.conv."),
    (r"\.expand_1x1\.normalization\.", ".conv1_1x1.bn."),
    (r"\.conv_3x3\.convolution\.", ".conv2_kxk.conv."),
    (r"\.conv_3x3\.normalization\.", ".conv2_kxk.bn."),
    (r"\.reduce_1x1\.convolution\.", ".conv3_1x1.conv."),
    (r"\.reduce_1x1\.normalization\.", ".conv3_1x1.bn."),
    (r"\.conv_kxk\.convolution\.", ".conv_kxk.conv."),
    (r"\.conv_kxk\.normalization\.", ".conv_kxk.bn."),
    (r"\.conv_1x1\.convolution\.", ".conv_1x1."),
    (r"\.transformer\.layer\.(\d+)\.layernorm_before\.", r".transformer.\1.norm1."),
    (r"\.transformer\.layer\.(\d+)\.attention\.(qkv_proj|out_proj)\.convolution\.", r".transformer.\1.attn.\2."),
    (r"\.transformer\.layer\.(\d+)\.layernorm_after\.", r".transformer.\1.norm2."),
    (r"\.transformer\.layer\.(\d+)\.ffn\.conv(\d)\.convolution\.", r".transformer.\1.mlp.fc\2."),
    (r"\.layernorm\.", ".norm."),  # the GroupNorm after the block's last layer
    (r"\.conv_projection\.convolution\.", ".conv_proj.conv."),
    (r"\.conv_projection\.normalization\.", ".conv_proj.bn."),
    (r"^classifier\.", "head.fc."),
)
_HF_RULES = tuple((re.compile(p), r) for p, r in HF_TO_TIMM)

# Segmentation-head name (cvnets "seg_head.*", HF "segmentation_head.*") -> the module names of
# MobileViTv2Segmentation (aspp, psp, classifier, aux_head), in timm's leaf naming.
SEG_HEAD_RULES: Tuple[Tuple[str, str], ...] = (
    (r"^seg_head\.aspp\.aspp_layer\.", "aspp."),
    (r"^segmentation_head\.aspp\.", "aspp."),
    (r"^seg_head\.psp_layer\.psp_branches\.(\d+)\.1\.", r"psp.branches_\1."),
    (r"^seg_head\.psp_layer\.fusion\.0\.", "psp.fusion."),
    (r"^seg_head\.aux_head\.0\.", "aux_head.conv."),
    (r"^seg_head\.aux_head\.2\.", "aux_head.classifier."),
    (r"^(seg_head|segmentation_head)\.classifier\.", "classifier."),
    (r"^aspp\.convs\.4\.(aspp_pool\.)?conv_1x1\.", "aspp.convs_4."),
    (r"^aspp\.convs\.(\d+)\.", r"aspp.convs_\1."),
    (r"\.block\.conv\.", ".conv."),
    (r"\.block\.norm\.", ".bn."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
    (r"^((?:aux_head\.)?classifier)\.conv\.", r"\1."),  # 1x1 convs with a bias, no norm
)
_SEG_HEAD_RULES = tuple((re.compile(p), r) for p, r in SEG_HEAD_RULES)

# SSD name (cvnets "extra_layers.*", "ssd_heads.*") -> the module names of MobileViTv2SSD
# (extra_os_64/128/256, extra_os_global, head_N.proj, head_N.loc_cls), in timm's leaf naming.
DETECTION_RULES: Tuple[Tuple[str, str], ...] = (
    (r"^extra_layers\.os_-1\.1\.block\.conv\.", "extra_os_global."),
    (r"^extra_layers\.os_(\d+)\.", r"extra_os_\1."),
    (r"^ssd_heads\.(\d+)\.proj_layer\.", r"head_\1.proj."),
    (r"^ssd_heads\.(\d+)\.loc_cls_layer\.pw_conv\.block\.conv\.", r"head_\1.loc_cls.pw."),  # conv with a bias, no norm
    (r"^ssd_heads\.(\d+)\.loc_cls_layer\.block\.conv\.", r"head_\1.loc_cls."),  # the global level's 1x1
    (r"^ssd_heads\.(\d+)\.loc_cls_layer\.", r"head_\1.loc_cls."),
    (r"\.(dw|pw)_conv\.", r".\1."),
    (r"\.block\.conv\.", ".conv."),
    (r"\.block\.norm\.", ".bn."),
)
_DETECTION_RULES = tuple((re.compile(p), r) for p, r in DETECTION_RULES)
_DETECTION_ROOTS = ("extra_layers.", "ssd_heads.")

_CVNETS_ROOTS = ("conv_1.", "layer_", "classifier.")
_TIMM_ROOTS = ("stem.", "stages.", "head.")
_CVNETS_SEG_ROOTS = ("encoder.", "seg_head.")
_HF_ROOTS = ("mobilevitv2.", "segmentation_head.")
SCHEMES = ("cvnets", "timm", "cvnets-segmentation", "hf", "cvnets-detection")


class ConversionError(DataError):
    """The checkpoint does not match the MobileViTv2 architecture."""


# --------------------------------------------------------------------------- reading


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, bfloat16 included) or array as a numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


WEIGHT_SETS = ("ema", "raw")
# A cvnets training checkpoint (training_checkpoint_last.pt and the like) holds both sets of weights.
_TRAINING_CHECKPOINT_KEYS = {"ema": "ema_state_dict", "raw": "model_state_dict"}


def _unwrap(obj: Any, path: str, weights: Optional[str] = None) -> Tuple[Mapping[str, Any], Optional[str]]:
    """(the state dict inside common wrappers, which weights of a training checkpoint it is).

    Wrappers: {'state_dict': ...}, {'model': ...}, 'module.' prefixes, and cvnets training
    checkpoints ({'model_state_dict', 'ema_state_dict', 'optim_state_dict', ...}), whose EMA
    weights are taken unless `weights` is "raw" (by default the raw ones where the run kept no EMA)."""
    if weights is not None and weights not in WEIGHT_SETS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_SETS)}, got {weights!r}")
    chosen = None
    if isinstance(obj, Mapping) and _TRAINING_CHECKPOINT_KEYS["raw"] in obj:
        chosen = weights or ("ema" if _TRAINING_CHECKPOINT_KEYS["ema"] in obj else "raw")
        if _TRAINING_CHECKPOINT_KEYS[chosen] not in obj:
            raise DataError(f"{path} is a training checkpoint without EMA weights (no 'ema_state_dict'): pass --weights raw")
        obj = obj[_TRAINING_CHECKPOINT_KEYS[chosen]]
    elif weights is not None:
        raise ConfigError(f"--weights {weights} applies to training checkpoints (with 'model_state_dict' and "
                          f"'ema_state_dict'); {path} holds one set of weights: leave --weights out")
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    if obj and not any(hasattr(v, "shape") for v in obj.values()):
        keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
        raise ConversionError(
            f"{path} holds no weights in a layout this converter knows: its top-level keys are {keys} (expected "
            f"tensors by name, or them under 'state_dict', 'model', or 'model_state_dict' / 'ema_state_dict')"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}, chosen


def _load_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {os.path.basename(path)} needs PyTorch: {INSTALL_HINT}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"refusing to load {path}: it is not a plain weights file (loading it would run code "
            f"from the pickle). Only tensors and plain containers are accepted. Details: {e}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DataError(f"could not read {path} as a PyTorch checkpoint: {e}") from e


def load_state_dict(path: str, weights: Optional[str] = None) -> StateDict:
    """Read a checkpoint file into {name: numpy array}, unwrapping common containers.

    ``.safetensors`` is read with numpy only; other files (``.pt``, ``.pth``, ``.bin``) with
    ``torch.load(weights_only=True)``. `weights` ("ema" or "raw") picks the set of a cvnets
    training checkpoint (default: EMA where it has them); see `read_weights`.
    """
    return read_weights(path, weights)[0]


def read_weights(path: str, weights: Optional[str] = None) -> Tuple[StateDict, Optional[str]]:
    """(state dict, "ema" / "raw" for a training checkpoint's chosen weights, else None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"checkpoint must be a file, got a directory: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            raw: Any = load_file(path)
        except (SafetensorError, OSError) as e:
            raise DataError(f"could not read {path} as safetensors: {e}") from e
    else:
        raw = _load_torch(path)
    state, chosen = _unwrap(raw, path, weights)
    return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}, chosen


# --------------------------------------------------------------------------- naming


def detect_scheme(names: Sequence[str]) -> str:
    """One of SCHEMES, from the root names of the state dict's keys."""
    # A segmentation or detection checkpoint is known by its head (a backbone alone names no scheme).
    if any(n.startswith(_DETECTION_ROOTS[1]) for n in names):
        return "cvnets-detection"
    if any(n.startswith(_HF_ROOTS[1]) for n in names):
        return "hf"
    if any(n.startswith(_CVNETS_SEG_ROOTS[1]) for n in names):
        return "cvnets-segmentation"
    cvnets = any(n.startswith(_CVNETS_ROOTS) for n in names)
    timm = any(n.startswith(_TIMM_ROOTS) for n in names)
    if cvnets == timm:
        sample = ", ".join(sorted(names)[:5]) or "(empty)"
        what = "both" if cvnets else "neither"
        raise ConversionError(
            f"cannot tell the checkpoint's naming scheme: its keys match {what} of cvnets "
            f"(conv_1., layer_N., classifier.) and timm (stem., stages., head.), nor a segmentation head of cvnets "
            f"(encoder., seg_head.) or HF transformers (mobilevitv2., segmentation_head.), nor a cvnets SSD (encoder., ssd_heads.); "
            f"first keys: {sample}"
        )
    return "cvnets" if cvnets else "timm"


def _apply(rules: Sequence[Tuple[re.Pattern, Any]], name: str) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


def cvnets_to_timm_name(name: str) -> str:
    """Rename one cvnets state-dict key to timm's name (unknown names pass through)."""
    return _apply(_CVNETS_RULES, name)


def _model_name(key: str, scheme: str) -> str:
    """A key's name in timm's naming (backbone) or the segmentation model's (head)."""
    if key.startswith(("seg_head.", "segmentation_head.")):
        return _apply(_SEG_HEAD_RULES, key)
    if key.startswith(_DETECTION_ROOTS):
        return _apply(_DETECTION_RULES, key)
    if scheme in ("cvnets-segmentation", "cvnets-detection") and key.startswith("encoder."):
        return cvnets_to_timm_name(key[len("encoder.") :])
    if scheme == "hf":
        return _apply(_HF_RULES, key[len("mobilevitv2.") :] if key.startswith("mobilevitv2.") else key)
    return cvnets_to_timm_name(key) if scheme == "cvnets" else key


def to_timm_names(state_dict: Mapping[str, np.ndarray]) -> Tuple[StateDict, Dict[str, str]]:
    """(state dict in timm names, {timm name: original name}), whatever the input scheme;
    segmentation- and detection-head keys get those models' module names."""
    scheme = detect_scheme(list(state_dict))
    if scheme == "timm":
        return dict(state_dict), {k: k for k in state_dict}
    renamed: StateDict = {}
    origin: Dict[str, str] = {}
    clashes = []
    v1 = scheme == "cvnets" and any(k.startswith(_CVNETS_V1_MARK) for k in state_dict)
    for key, value in state_dict.items():
        new = _apply(_CVNETS_V1_RULES, key) if v1 else _model_name(key, scheme)
        if new in renamed:
            clashes.append(f"{origin[new]} and {key} both map to {new}")
            continue
        renamed[new], origin[new] = value, key
    if clashes:
        raise ConversionError(f"{scheme} keys that map to the same name:\n  " + "\n  ".join(clashes))
    return renamed, origin


# Flax module path <-> timm module name, one table for both directions. Each pair names the
# same module: "{n}" stands for a number, and a name matches whole dot-separated components.
TIMM_FLAX_MODULES = (
    ("stages.{n}.{n}", "stages_{n}_{n}"),
    ("transformer.{n}", "transformer_{n}"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("head.fc", "head"),
)
# timm leaf name <-> (Flax collection, leaf); timm's "weight" is a kernel (rank >= 2) or a scale.
TIMM_FLAX_LEAVES = (
    ("weight", ("params", "kernel")),
    ("weight", ("params", "scale")),
    ("bias", ("params", "bias")),
    ("running_mean", ("batch_stats", "mean")),
    ("running_var", ("batch_stats", "var")),
)
_DROPPED_LEAVES = ("num_batches_tracked",)


def _rule(source: str, target: str) -> Tuple[re.Pattern, str]:
    """A regex rewriting module name `source` into `target` (templates of TIMM_FLAX_MODULES)."""
    pattern = re.escape(source).replace(re.escape("{n}"), r"(\d+)")
    count = iter(range(1, source.count("{n}") + 1))
    replacement = re.sub(r"\{n\}", lambda _: f"\\{next(count)}", target.replace("\\", "\\\\"))
    return re.compile(rf"(?<![^.]){pattern}(?![^.])"), replacement


_TIMM_TO_FLAX = tuple(_rule(timm, flax) for timm, flax in TIMM_FLAX_MODULES)
_FLAX_TO_TIMM = tuple(_rule(flax, timm) for timm, flax in TIMM_FLAX_MODULES)


def _timm_module_to_flax(module: str) -> str:
    for pattern, repl in _TIMM_TO_FLAX:
        module = pattern.sub(repl, module)
    return module


def timm_key_to_path(key: str, ndim: int) -> Optional[Path]:
    """The Flax variable path of timm key `key` (an array of rank `ndim`); None if dropped."""
    module, _, leaf = key.rpartition(".")
    if leaf in _DROPPED_LEAVES:
        return None
    module = _timm_module_to_flax(module)
    parts = tuple(module.split(".")) if module else ()
    matches = [flax for timm, flax in TIMM_FLAX_LEAVES if timm == leaf]
    if not matches:
        return ("unknown", *parts, leaf)  # never a model variable: reported as unexpected
    collection, name = matches[0] if len(matches) == 1 or ndim >= 2 else matches[1]
    return (collection, *parts, name)


def path_to_timm_key(path: Path) -> str:
    """The timm key of Flax variable `path` (the inverse of `timm_key_to_path`; the
    multi-head unit's query / key / value and out are MobileViTv1's fused qkv and proj)."""
    collection, *modules, leaf = path
    if modules[-2:-1] == ["mha"]:
        modules = modules[:-2] + ["qkv" if modules[-1] in ("query", "key", "value") else "proj"]
    name = ".".join(modules)
    for pattern, repl in _FLAX_TO_TIMM:
        name = pattern.sub(repl, name)
    timm_leaf = next(timm for timm, flax in TIMM_FLAX_LEAVES if flax == (collection, leaf))
    return f"{name}.{timm_leaf}"


def torch_to_flax(value: np.ndarray, target_shape: Tuple[int, ...]) -> np.ndarray:
    """Re-lay a PyTorch weight for Flax: OIHW -> HWIO, [out, in(,1,1)] -> [in, out]."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0].T
    if value.ndim == 2 and len(target_shape) == 2:
        return value.T
    return value


def flax_to_torch_shape(shape: Tuple[int, ...], torch_ndim: int) -> Tuple[int, ...]:
    """The PyTorch shape that `torch_to_flax` turns into the Flax `shape`."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2 and torch_ndim == 4:
        return (shape[1], shape[0], 1, 1)
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


# --------------------------------------------------------------------------- architecture


def _shape(state_dict: Mapping[str, np.ndarray], key: str) -> Tuple[int, ...]:
    if key not in state_dict:
        raise ConversionError(f"cannot read the model's widths: the checkpoint has no {key!r}")
    return tuple(state_dict[key].shape)


def widths_in(state_dict: Mapping[str, np.ndarray]) -> Widths:
    """The channel widths stored in a timm-named MobileViTv2 state dict."""
    def out(key: str) -> int:
        return _shape(state_dict, key)[0]

    return Widths(
        stem=out("stem.conv.weight"),
        layer1=out("stages.0.0.conv3_1x1.conv.weight"),
        layer2=out("stages.1.0.conv3_1x1.conv.weight"),
        layer3=out("stages.2.0.conv3_1x1.conv.weight"),
        layer4=out("stages.3.0.conv3_1x1.conv.weight"),
        layer5=out("stages.4.0.conv3_1x1.conv.weight"),
        attn3=out("stages.2.1.conv_1x1.weight"),
        attn4=out("stages.3.1.conv_1x1.weight"),
        attn5=out("stages.4.1.conv_1x1.weight"),
    )


def detect_alpha(state_dict: Mapping[str, np.ndarray]) -> float:
    """The width multiplier whose `widths_for` reproduces every width in the state dict."""
    found = widths_in(state_dict)
    candidates = list(STANDARD_ALPHAS) + [found.layer5 / 512, found.layer4 / 384, found.layer3 / 256]
    for alpha in candidates:
        if alpha > 0 and widths_for(alpha) == found:
            return float(alpha)
    raise ConversionError(
        f"no width multiplier reproduces the checkpoint's widths {found}; tried alpha in "
        f"{[round(a, 4) for a in candidates]}"
    )


def is_v1(named: Mapping[str, np.ndarray]) -> bool:
    """Whether a timm-named state dict is a MobileViTv1 (its blocks have a fusion conv)."""
    return "stages.2.1.conv_fusion.conv.weight" in named


def detect_v1_variant(named: Mapping[str, np.ndarray]) -> str:
    """The MobileViTv1 size ("xxs", "xs", "s") whose widths the timm-named state dict has."""
    stage_out = ["stages.0.0.conv3_1x1.conv.weight", "stages.1.0.conv3_1x1.conv.weight"] + [
        f"stages.{s}.1.conv_fusion.conv.weight" for s in (2, 3, 4)]
    found = (
        tuple(_shape(named, key)[0] for key in stage_out),
        tuple(_shape(named, f"stages.{s}.1.conv_1x1.weight")[0] for s in (2, 3, 4)),
        _shape(named, "final_conv.conv.weight")[0],
    )
    for name, v in V1_VARIANTS.items():
        if (v.stages, v.attn_dims, v.num_features) == found:
            return name
    raise ConversionError(f"no MobileViTv1 size ({', '.join(V1_VARIANTS)}) has the checkpoint's widths "
                          f"(stages, transformer widths, final conv) {found}")


_V1_ATTENTION = re.compile(r"^(stages\.\d+\.\d+\.transformer\.\d+)\.attn\.(qkv|proj)\.(weight|bias)$")


def split_attention(named: Mapping[str, np.ndarray], num_heads: int) -> Tuple[StateDict, Dict[Path, Tuple[str, np.ndarray]]]:
    """(the state dict without its fused attention weights, {Flax path: (timm key, array)}).

    MobileViTv1's attention (timm `attn.qkv` [3D, D] in q, k, v order, `attn.proj`) is the
    model's multi-head unit, whose query / key / value / out kernels are [D, heads, D/heads]
    and [heads, D/heads, D]."""
    rest: StateDict = {}
    out: Dict[Path, Tuple[str, np.ndarray]] = {}
    for key, value in named.items():
        m = _V1_ATTENTION.match(key)
        if m is None:
            rest[key] = value
            continue
        module, kind, leaf = m.groups()
        parts = ("params", *_timm_module_to_flax(module).split("."), "attn", "mha")
        d = value.shape[-1] if leaf == "weight" else value.shape[0] // (3 if kind == "qkv" else 1)
        if d % num_heads or (kind == "qkv" and value.shape[0] != 3 * d):
            out[(*parts, "query" if kind == "qkv" else "out", "kernel" if leaf == "weight" else "bias")] = (key, value)
            continue
        head = (num_heads, d // num_heads)
        if kind == "qkv":
            for i, name in enumerate(("query", "key", "value")):
                part = value[i * d:(i + 1) * d]
                out[(*parts, name, "kernel" if leaf == "weight" else "bias")] = (key, part.T.reshape(d, *head) if leaf == "weight" else part.reshape(head))
        else:
            out[(*parts, "out", "kernel" if leaf == "weight" else "bias")] = (key, value.T.reshape(*head, value.shape[0]) if leaf == "weight" else value)
    return rest, out


def detect_num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
    """Number of classes of the timm-named state dict's classifier."""
    return _shape(state_dict, "head.fc.weight")[0]


# Output stride and ASPP rates of the official segmentation recipes, by class count.
SEGMENTATION_RECIPES = {150: ("ADE20k", 8, (12, 24, 36)), 21: ("PASCAL VOC", 16, (6, 12, 18))}
SEGMENTATION_DEFAULT = (16, (6, 12, 18))  # the official code's defaults
PSP_POOL_SIZES = (1, 2, 3, 6)


def is_segmentation(named: Mapping[str, np.ndarray]) -> bool:
    """Whether a renamed state dict (see to_timm_names) holds a segmentation head."""
    return any(k.startswith(("aspp.", "psp.", "classifier.")) for k in named)


def segmentation_model(
    named: Mapping[str, np.ndarray],
    alpha: float,
    output_stride: Optional[int] = None,
    aspp_rates: Optional[Sequence[int]] = None,
) -> MobileViTv2Segmentation:
    """The segmentation model a renamed state dict describes; what the weights cannot tell
    (output stride, ASPP rates) from the arguments, else the recipe of its class count."""
    if "aspp.project.conv.weight" in named:
        head, features = "deeplabv3", {"aspp_features": _shape(named, "aspp.project.conv.weight")[0]}
    elif "psp.fusion.conv.weight" in named:
        head, features = "pspnet", {"psp_features": _shape(named, "psp.fusion.conv.weight")[0]}
        branches = {k.split(".")[1] for k in named if k.startswith("psp.branches_")}
        if len(branches) != len(PSP_POOL_SIZES):
            raise ConversionError(
                f"the PSPNet head has {len(branches)} pyramid branches; the official pool sizes "
                f"{PSP_POOL_SIZES} need {len(PSP_POOL_SIZES)}"
            )
    else:
        raise ConversionError("the segmentation checkpoint has neither a DeepLabv3 (aspp.project) nor a PSPNet (psp_layer.fusion) head")
    num_classes = _shape(named, "classifier.weight")[0]
    recipe_stride, recipe_rates = SEGMENTATION_RECIPES.get(num_classes, (None, *SEGMENTATION_DEFAULT))[1:]
    output_stride = int(output_stride or recipe_stride)
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    rates = tuple(int(r) for r in (aspp_rates or recipe_rates))
    if len(rates) != 3 or min(rates) < 1:
        raise ConfigError(f"ASPP rates must be three positive dilations such as 6 12 18, got {rates}")
    return MobileViTv2Segmentation(
        alpha=alpha,
        num_classes=num_classes,
        head=head,
        output_stride=output_stride,
        aux_head=any(k.startswith("aux_head.") for k in named),
        aspp_rates=rates,
        **features,
    )


def is_detection(named: Mapping[str, np.ndarray]) -> bool:
    """Whether a renamed state dict (see to_timm_names) holds SSD heads."""
    return any(k.startswith("head_") for k in named)


def detection_model(named: Mapping[str, np.ndarray], alpha: float) -> MobileViTv2SSD:
    """The SSDLite a renamed state dict describes: the class count from the first level's
    predictions, each level's projection width from its prediction layer's depthwise conv
    (the global level's from its 1x1 conv)."""
    levels = len(anchor_lib.OUTPUT_STRIDES)
    heads = sorted({int(k.split(".")[0][len("head_"):]) for k in named if k.startswith("head_")})
    if heads != list(range(levels)):
        raise ConversionError(f"the SSD checkpoint has prediction heads {heads}; the official output strides {anchor_lib.OUTPUT_STRIDES} need {levels}")
    outputs = _shape(named, "head_0.loc_cls.pw.weight")[0]
    per_anchor, rest = divmod(outputs, anchor_lib.anchors_per_cell(anchor_lib.ASPECT_RATIOS[0]))
    if rest or per_anchor <= 5:
        raise ConversionError(f"the first SSD head predicts {outputs} channels: not {anchor_lib.anchors_per_cell(anchor_lib.ASPECT_RATIOS[0])} anchors x (4 + classes)")
    proj = [_shape(named, f"head_{i}.loc_cls.dw.conv.weight")[0] for i in range(levels - 1)]
    proj.append(_shape(named, "extra_os_global.weight")[0])
    return MobileViTv2SSD(alpha=alpha, num_classes=per_anchor - 4, proj_channels=tuple(proj))


# --------------------------------------------------------------------------- conversion


def _torch_ndim(path: Path, ndim: int) -> int:
    """Rank of the PyTorch weight behind Flax variable `path`: Dense kernels of the
    transformer were 1x1 convs, the head's is a Linear."""
    return 4 if ndim == 2 and path[1] != "head" else ndim


Model = Union[MobileViTv2, MobileViTv2Segmentation, MobileViTv2SSD, MobileViT]


def convert_state_dict(
    state_dict: Mapping[str, Any],
    output_stride: Optional[int] = None,
    aspp_rates: Optional[Sequence[int]] = None,
) -> Tuple[Model, Dict[str, Any]]:
    """(model, {'params', 'batch_stats'}) from a state dict in any of SCHEMES: a MobileViTv2
    classifier or a MobileViTv2Segmentation (output_stride and aspp_rates: see
    segmentation_model).

    Raises ConversionError listing every missing key, unexpected key and wrong shape.
    """
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    scheme = detect_scheme(list(arrays))
    named, origin = to_timm_names(arrays)
    split: Dict[Path, Tuple[str, np.ndarray]] = {}
    if is_v1(named):
        model: Model = MobileViT(variant=detect_v1_variant(named), num_classes=detect_num_classes(named))
        described = f"MobileViT(variant={model.variant!r}, num_classes={model.num_classes})"
        named, split = split_attention(named, model.num_heads)
    elif is_detection(named):
        model = detection_model(named, detect_alpha(named))
        described = f"MobileViTv2SSD(alpha={model.alpha}, num_classes={model.num_classes}, proj_channels={model.proj_channels})"
    elif is_segmentation(named):
        model = segmentation_model(named, detect_alpha(named), output_stride, aspp_rates)
        described = f"MobileViTv2Segmentation(alpha={model.alpha}, head={model.head!r}, num_classes={model.num_classes}, aux_head={model.aux_head})"
    else:
        model = MobileViTv2(alpha=detect_alpha(named), num_classes=detect_num_classes(named))
        described = f"MobileViTv2(alpha={model.alpha}, num_classes={model.num_classes})"
    target = traverse_util.flatten_dict(abstract_variables(model, (64, 64)))

    def shown(name: str) -> str:
        return name if scheme == "timm" else f"{origin[name]} (timm name {name})"

    flat: Dict[Path, np.ndarray] = {}
    seen: Set[Path] = set()  # target paths present in the checkpoint, whatever their shape
    unexpected: List[str] = []
    wrong_shape: List[str] = []
    for path, (key, value) in split.items():  # MobileViTv1's attention, already laid out for Flax
        if path not in target:
            unexpected.append(f"{shown(key)} {tuple(value.shape)}")
        elif tuple(value.shape) != tuple(target[path].shape):
            seen.add(path)
            wrong_shape.append(f"{shown(key)}: got {tuple(arrays[origin[key]].shape)}, expected {tuple(target[path].shape)} in Flax's layout")
        else:
            seen.add(path)
            flat[path] = np.ascontiguousarray(value, dtype=target[path].dtype)
    for key, value in named.items():
        path = timm_key_to_path(key, value.ndim)
        if path is None:
            continue
        if path not in target and path[-1] in ("kernel", "scale"):  # weight of an unexpected rank
            other = path[:-1] + ("scale" if path[-1] == "kernel" else "kernel",)
            path = other if other in target else path
        if path not in target:
            unexpected.append(f"{shown(key)} {tuple(value.shape)}")
            continue
        seen.add(path)
        want = tuple(target[path].shape)
        converted = torch_to_flax(value, want)
        if tuple(converted.shape) != want:
            expected = flax_to_torch_shape(want, _torch_ndim(path, len(want)))
            wrong_shape.append(f"{shown(key)}: got {tuple(value.shape)}, expected {expected}")
            continue
        flat[path] = np.ascontiguousarray(converted, dtype=target[path].dtype)
    missing = sorted({
        f"{path_to_timm_key(p)}" + ("" if "mha" in p else f" {flax_to_torch_shape(tuple(s.shape), _torch_ndim(p, len(s.shape)))}")
        for p, s in target.items()
        if p not in seen
    })
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint ({scheme} names) does not match {described}:"]
        for title, items in (
            ("missing keys (timm names)", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in sorted(items))
        raise ConversionError("\n".join(lines))
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    return model, variables


SEGMENTATION_IMAGE_SIZE = 512  # the official segmentation crops and evaluation short side
DETECTION_IMAGE_SIZE = 320  # the official SSD input


def default_image_size(src: str) -> int:
    """384 for checkpoints whose file name mentions 384, else 256."""
    return 384 if "384" in os.path.basename(os.fspath(src)) else 256


def hf_config(src: str) -> Dict[str, Any]:
    """The output stride, ASPP rates and id2label in the HF transformers config.json beside `src`, if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"could not read {path} (the HF config beside the checkpoint): {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != "mobilevitv2":
        return {}
    found = (("output_stride", config.get("output_stride")), ("aspp_rates", config.get("atrous_rates")), ("id2label", config.get("id2label")))
    return {k: v for k, v in found if v}


def segmentation_class_names(num_classes: int, hf: Mapping[str, Any]) -> Optional[List[str]]:
    """The class names of a converted segmentation model: HF config.json's id2label, else
    PASCAL VOC's for 21 classes and ADE20k's for 150 (the official datasets of those sizes)."""
    from mvit2_jax.data.label_names import ADE20K_CLASSES, VOC_CLASSES

    id2label = hf.get("id2label") or {}
    if len(id2label) == num_classes:
        return [str(id2label[str(i)]) if str(i) in id2label else f"class {i}" for i in range(num_classes)]
    return {21: VOC_CLASSES, 150: ADE20K_CLASSES}.get(num_classes)


def _check_destination(dst: str) -> None:
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConfigError(f"destination {dst} exists and is not an empty directory: choose a new one")


def convert(
    src: str,
    dst: str,
    image_size: Optional[Union[int, Sequence[int]]] = None,
    output_stride: Optional[int] = None,
    aspp_rates: Optional[Sequence[int]] = None,
    weights: Optional[str] = None,
    source: Optional[str] = None,
) -> str:
    """Convert checkpoint file `src` into a model directory `dst` (new or empty); returns dst.

    `output_stride` and `aspp_rates` apply to segmentation checkpoints (default: the HF
    config.json beside `src`, else the official recipe of the class count). `weights` ("ema"
    or "raw") picks the set of a cvnets training checkpoint (default: EMA where it has them).
    `source` is what DST records as its origin (default: SRC's absolute path)."""
    src, dst = os.fspath(src), os.fspath(dst)
    _check_destination(dst)
    state_dict, chosen = read_weights(src, weights)
    defaults = hf_config(src)
    model, variables = convert_state_dict(
        state_dict, output_stride or defaults.get("output_stride"), aspp_rates or defaults.get("aspp_rates")
    )
    segmentation = isinstance(model, MobileViTv2Segmentation)
    detection = isinstance(model, MobileViTv2SSD)
    if image_size is None:
        image_size = SEGMENTATION_IMAGE_SIZE if segmentation else DETECTION_IMAGE_SIZE if detection else default_image_size(src)
    size = [int(image_size)] * 2 if isinstance(image_size, (int, np.integer)) else [int(s) for s in image_size]
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size must be N or (height, width) with positive values, got {image_size!r}")
    meta = {"source": source or os.path.abspath(src), "image_size": size}
    if chosen:
        meta["weights"] = chosen
    if detection and (size[0] % 32 or size[1] % 32):
        raise ConfigError(f"an SSD's image size must be divisible by 32, got {size[0]}x{size[1]}")
    if segmentation:
        meta["class_names"] = segmentation_class_names(model.num_classes, defaults)
    if detection:
        from mvit2_jax.data.label_names import detection_class_names

        meta["class_names"] = detection_class_names(model.num_classes)
    task = "segmentation" if segmentation else "detection" if detection else "classification"
    return save_model(dst, model, variables, meta=meta, task=task)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m mvit2_jax.convert",
        description="Convert an official MobileViTv2 checkpoint (cvnets .pt, timm .safetensors/.pth/.bin, "
        "cvnets DeepLabv3/PSPNet segmentation, HF transformers, cvnets SSDLite detection) into an mvit2_jax model directory.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file")
    parser.add_argument("dst", metavar="DST", help="new or empty output directory")
    parser.add_argument(
        "--image-size", type=int, default=None, metavar="N",
        help="training/evaluation resolution to record (default: 512 for segmentation, 320 for SSD; 384 if SRC's name contains 384, "
        "else 256: the official 384x384 classifiers' files have the 256 files' names, so give 384 for them)",
    )
    parser.add_argument(
        "--weights", choices=WEIGHT_SETS, default=None,
        help="a cvnets training checkpoint (training_checkpoint_last.pt): its EMA or raw weights (default: EMA where it has them)",
    )
    parser.add_argument(
        "--output-stride", type=int, default=None, choices=OUTPUT_STRIDES,
        help="segmentation: the backbone's output stride (default: HF config.json, else 8 for 150 classes (ADE20k), else 16)",
    )
    parser.add_argument(
        "--aspp-rates", type=int, nargs=3, default=None, metavar="R",
        help="DeepLabv3: the three ASPP dilation rates (default: HF config.json, else 12 24 36 for 150 classes, else 6 12 18)",
    )
    args = parser.parse_args(argv)
    with usage_errors_exit(f"{parser.prog}: error"):
        try:
            dst = convert(args.src, args.dst, args.image_size, args.output_stride, args.aspp_rates, args.weights)
        except ImportError as e:  # torch, for a pickled checkpoint
            raise ConfigError(str(e)) from None
    print(f"wrote {dst}: {describe(dst)}")
    return 0


def describe(path: str) -> str:
    """One line on a converted model directory: task, model, classes, the recorded image size and weights."""
    meta = read_config(path)[0]
    model, (height, width) = meta["model"], meta["image_size"]
    name = {"segmentation": f"{model.get('head')} on ", "detection": "SSDLite on "}.get(meta["task"], "")
    arch = f"MobileViTv1-{model['variant'].upper()}" if model.get("family") == "mobilevit" else f"MobileViTv2-{model['alpha']}"
    line = f"{meta['task']}, {name}{arch}, {model['num_classes']} classes, image size {height}x{width} recorded"
    if meta.get("weights"):
        line += f", the training checkpoint's {'EMA' if meta['weights'] == 'ema' else 'raw'} weights"
    return line


if __name__ == "__main__":
    sys.exit(main())
