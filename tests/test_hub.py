"""Official weights by hub name (mvit2_jax.hub), offline: each test fills a Hugging Face cache
with the timm parity fixture, laid out as huggingface_hub lays out what it downloads."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import mvit2_jax
from mvit2_jax import hub, tasks, train
from mvit2_jax.checkpoint import read_config
from mvit2_jax.errors import ConfigError, DataError
from mvit2_jax.models import MobileViT
from mvit2_jax.predict import predict

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mobilevitv2_050_parity.safetensors"
V1_FIXTURE = FIXTURE.with_name("mobilevit_xxs_parity.safetensors")
NAME = "hf-hub:timm/mobilevitv2_050.cvnets_in1k"
COMMIT = "3f1c2b9a0d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """fill(repo_id): puts the fixture into an offline Hugging Face cache as repo_id's model.safetensors."""
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MVIT2_JAX_CACHE", str(tmp_path / "mvit2"))

    def fill(repo_id: str, fixture: Path = FIXTURE) -> None:
        repo = hf / ("models--" + repo_id.replace("/", "--"))
        (repo / "snapshots" / COMMIT).mkdir(parents=True)
        shutil.copy(fixture, repo / "snapshots" / COMMIT / "model.safetensors")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)

    return fill


def test_a_hub_name_loads_offline_from_the_cache_converted_once(hub_cache, converted_050, monkeypatch):
    hub_cache("timm/mobilevitv2_050.cvnets_in1k")
    model, variables = mvit2_jax.load_model(NAME)
    expected_model, expected = mvit2_jax.load_model(converted_050)
    assert model == expected_model
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    local = hub.local_path(NAME)
    assert local == str(Path(hub.cache_dir()) / "timm--mobilevitv2_050.cvnets_in1k" / COMMIT)
    meta = read_config(local)[0]
    assert meta["image_size"] == [256, 256] and meta["source"] == f"hf-hub:timm/mobilevitv2_050.cvnets_in1k@{COMMIT}"

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(hub.convert_lib, "convert", no_conversion)
    assert mvit2_jax.load_model(NAME)[0] == model  # the converted copy, reused


def test_384_tags_record_384_and_the_listing_shows_the_converted_ones(hub_cache, capsys):
    name = "hf-hub:timm/mobilevitv2_150.cvnets_in22k_ft_in1k_384"
    hub_cache(name[len(hub.PREFIX):])  # (the 0.5 fixture stands in for the 1.5 weights)
    assert hub.main([name]) == 0
    assert read_config(hub.local_path(name))[0]["image_size"] == [384, 384]
    capsys.readouterr()
    assert hub.main([]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(hub.PUBLISHED) == 16
    listed = {line.split()[0]: line for line in lines}
    assert "384x384" in listed[name] and "converted here" in listed[name]
    assert "256x256" in listed[NAME] and "converted here" not in listed[NAME]
    assert "MobileViTv1" in listed["hf-hub:timm/mobilevit_xxs.cvnets_in1k"]


def test_without_network_or_cached_copy_the_error_is_one_line(hub_cache, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hub.main([NAME])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE is set" in err
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        mvit2_jax.load_model(NAME)

    # Online but unreachable: huggingface_hub's own error for a failed download and no cached copy.
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(DataError, match=r"could not download .* \(no network\?\) and there is no cached copy"):
        hub.resolve(NAME)


def test_a_bad_name_is_a_clear_error(hub_cache):
    with pytest.raises(ConfigError, match="write hf-hub:OWNER/REPO"):
        hub.resolve("hf-hub:mobilevitv2_050")


def test_a_mobilevit_v1_name_gives_the_v1_model(hub_cache):
    hub_cache("timm/mobilevit_xxs.cvnets_in1k", V1_FIXTURE)
    model, _ = mvit2_jax.load_model("hf-hub:timm/mobilevit_xxs.cvnets_in1k")
    assert isinstance(model, MobileViT) and (model.variant, model.num_classes) == ("xxs", 1000)


def test_predict_and_init_from_take_hub_names(hub_cache, converted_050, small_config, tmp_path):
    hub_cache("timm/mobilevitv2_050.cvnets_in1k")
    image = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)).save(image)
    results, errors = predict(NAME, [str(image)], top_k=3)
    assert errors == [] and results == predict(converted_050, [str(image)], top_k=3)[0]

    # init_from reads the hub name's converted model (a 0.5 model: the 0.75 run is refused naming it).
    config = small_config()
    config.init_from = NAME
    config.model.alpha = 0.75
    with pytest.raises(ConfigError, match=f"config.init_from={hub.local_path(NAME)} holds a alpha=0.5 model"):
        train.init_from_pretrained(None, config, tasks.get("classification"), None)
