"""Official weights by name from the Hugging Face hub: ``hf-hub:timm/mobilevitv2_100.cvnets_in1k``.

A name ``hf-hub:OWNER/REPO`` stands for a model directory wherever one is accepted:
`mvit2_jax.load_model`, ``python -m mvit2_jax.predict --checkpoint``, ``--config.init_from``
and evaluation. The repository's ``model.safetensors`` is fetched with `huggingface_hub`
into its own cache (``HF_HOME`` / ``HF_HUB_CACHE``), converted once by `mvit2_jax.convert`
into ``$MVIT2_JAX_CACHE/hub/OWNER--REPO/COMMIT`` (default ``~/.cache/mvit2_jax``), and that
directory is used from then on. A copy already in the Hugging Face cache is used without a
network request; with ``HF_HUB_OFFLINE=1`` only cached copies are used. The 384x384 tags
(``..._384``) record 384x384, the others 256x256.

    python -m mvit2_jax.hub                # the official names, and which are converted here
    python -m mvit2_jax.hub NAME [NAME...]   # fetch and convert; print each local directory

Any hub repository holding a MobileViTv2 or MobileViTv1 ``model.safetensors`` in a naming the
converter reads (timm, cvnets, HF transformers) works the same way; `PUBLISHED` lists the
official ones.
"""

from __future__ import annotations

import argparse
import contextlib
import logging as std_logging
import os
import shutil
import sys
import tempfile
from typing import List, NamedTuple, Optional, Sequence

from absl import logging

from mvit2_jax import convert as convert_lib
from mvit2_jax.errors import ConfigError, DataError, usage_errors_exit

PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"


class Published(NamedTuple):
    repo_id: str
    family: str  # "mobilevitv2" or "mobilevit" (v1)
    image_size: int
    pretraining: str


def _published() -> List[Published]:
    v2 = [Published(f"timm/mobilevitv2_{w}.cvnets_in1k", "mobilevitv2", 256, "ImageNet-1k")
          for w in ("050", "075", "100", "125", "150", "175", "200")]
    for w in ("150", "175", "200"):
        v2.append(Published(f"timm/mobilevitv2_{w}.cvnets_in22k_ft_in1k", "mobilevitv2", 256, "ImageNet-21k, fine-tuned on 1k"))
        v2.append(Published(f"timm/mobilevitv2_{w}.cvnets_in22k_ft_in1k_384", "mobilevitv2", 384, "ImageNet-21k, fine-tuned on 1k at 384"))
    v1 = [Published(f"timm/mobilevit_{s}.cvnets_in1k", "mobilevit", 256, "ImageNet-1k") for s in ("xxs", "xs", "s")]
    return v2 + v1


PUBLISHED = _published()
_BY_REPO = {p.repo_id: p for p in PUBLISHED}


def is_hub_name(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def local_path(path: str) -> str:
    """`path` itself, or for an ``hf-hub:`` name the converted model directory (fetched and
    converted on first use)."""
    return resolve(path) if is_hub_name(path) else path


def repo_id_of(name: str) -> str:
    repo_id = name[len(PREFIX):] if is_hub_name(name) else name
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{name!r} is not a hub name: write hf-hub:OWNER/REPO, e.g. {PREFIX}{PUBLISHED[2].repo_id}")
    return repo_id


def cache_dir() -> str:
    """Where converted hub models live: $MVIT2_JAX_CACHE/hub, else $XDG_CACHE_HOME/mvit2_jax/hub (~/.cache)."""
    root = os.environ.get("MVIT2_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mvit2_jax")
    return os.path.join(root, "hub")


def _hf_cache() -> Optional[str]:
    # Read at call time (huggingface_hub reads its environment once, at import).
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(name: str) -> str:
    """The local path of the repository's model.safetensors: the cached copy, else downloaded."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, cache = repo_id_of(name), _hf_cache()
    where = cache or constants.HF_HUB_CACHE
    try:  # a cached copy: no network request (the official weights do not change)
        return hf_hub_download(repo_id, WEIGHTS_FILE, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise DataError(f"{name} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE is set: "
                        f"fetch it once with network (python -m mvit2_jax.hub {name}) or unset HF_HUB_OFFLINE")
    quiet = contextlib.ExitStack()
    hf_logger = std_logging.getLogger("huggingface_hub")
    quiet.callback(hf_logger.setLevel, hf_logger.level)
    hf_logger.setLevel(std_logging.ERROR)  # its retry warnings: the outcome is reported below, in one line
    try:
        with quiet:
            return hf_hub_download(repo_id, WEIGHTS_FILE, cache_dir=cache)
    except LocalEntryNotFoundError:
        raise DataError(f"could not download {name} (no network?) and there is no cached copy in {where}: "
                        f"connect to the internet, or copy a filled cache there and set HF_HUB_OFFLINE=1") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise DataError(f"no repository {repo_id} on the Hugging Face hub (or it is private): "
                        f"python -m mvit2_jax.hub lists the official names") from None
    except EntryNotFoundError:
        raise DataError(f"{name} has no {WEIGHTS_FILE}: mvit2_jax reads the timm / HF safetensors files") from None
    except HfHubHTTPError as e:
        raise DataError(f"could not download {name}: {str(e).splitlines()[0]}") from None


def resolve(name: str, image_size: Optional[int] = None) -> str:
    """The converted model directory of hub name `name` (fetched and converted on first use).

    `image_size` overrides the recorded resolution (default: 384 for ``..._384`` tags, else 256)."""
    repo_id = repo_id_of(name)
    published = _BY_REPO.get(repo_id)
    weights = download(name)
    commit = os.path.basename(os.path.dirname(weights))  # .../snapshots/COMMIT/model.safetensors
    target = os.path.join(cache_dir(), repo_id.replace("/", "--"), commit)
    if os.path.isdir(target) and os.listdir(target):
        return target
    if image_size is None:
        image_size = published.image_size if published else (384 if repo_id.endswith("_384") else 256)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Converted beside the target and renamed into place: a target that exists is complete,
    # whichever process (or host) wrote it first.
    scratch = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        written = convert_lib.convert(weights, os.path.join(scratch, "model"), image_size=image_size,
                                      source=f"{PREFIX}{repo_id}@{commit}")
        try:
            os.replace(written, target)
        except OSError:
            if not (os.path.isdir(target) and os.listdir(target)):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logging.info("Converted %s into %s", name, target)
    return target


def converted(repo_id: str) -> List[str]:
    """The converted copies of `repo_id` in the cache (one per hub commit)."""
    directory = os.path.join(cache_dir(), repo_id.replace("/", "--"))
    return sorted(os.path.join(directory, c) for c in os.listdir(directory) if not c.startswith(".")) if os.path.isdir(directory) else []


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mvit2_jax.hub",
        description="List the official MobileViT weights on the Hugging Face hub, or fetch and convert some by name.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="hf-hub:OWNER/REPO names to fetch and convert")
    parser.add_argument("--image-size", type=int, default=None, metavar="N", help="resolution to record (default: 384 for _384 tags, else 256)")
    args = parser.parse_args(argv)
    with usage_errors_exit(f"{parser.prog}: error"):
        if args.names:
            for name in args.names:
                print(f"{name}: {resolve(name, args.image_size)}")
            return 0
        print(f"converted copies live in {cache_dir()}")
        for p in PUBLISHED:
            family = "MobileViTv1" if p.family == "mobilevit" else "MobileViTv2"
            state = "converted here" if converted(p.repo_id) else ""
            print(f"{PREFIX}{p.repo_id:<48} {family}  {p.image_size}x{p.image_size}  {p.pretraining:<38} {state}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
