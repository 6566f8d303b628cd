"""The model-statistics command: parameters and GMACs next to the paper's numbers."""

import pytest

from mvit2_jax.models import VARIANTS, MobileViT, MobileViTv2
from mvit2_jax.stats import main, model_stats


@pytest.mark.parametrize("alpha", sorted(VARIANTS))
def test_params_exact_and_gmacs_within_a_tenth_of_a_percent_of_the_paper(alpha):
    stats = model_stats(MobileViTv2(alpha=alpha), 256)
    variant = VARIANTS[alpha]
    assert stats["params"] == variant.params
    assert abs(stats["macs"] / 1e9 - variant.gmacs) / variant.gmacs < 0.001


def test_macs_grow_with_resolution():
    small = model_stats(MobileViTv2(alpha=0.5), 256)["macs"]
    large = model_stats(MobileViTv2(alpha=0.5), 384)["macs"]
    assert 2.0 < large / small < 2.5  # (384/256)^2 = 2.25 for the convolutions


def test_cli_prints_a_row_per_width(capsys):
    main(["--alphas", "0.5,0.75", "--v1", ""])
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:3] == ["0.5", "1,370,593", "1,370,593"]
    assert out[3].split()[0] == "0.75" and len(out) == 4


def test_cli_shows_mobilevit_v1_beside_v2_with_its_attention_products(capsys):
    main(["--alphas", "0.5", "--v1", "xxs,s"])
    out = capsys.readouterr().out.splitlines()
    assert out[4].startswith("MobileViTv1") and [line.split()[:3] for line in out[6:]] == [
        ["XXS", "1,272,024", "1,272,024"], ["S", "5,578,632", "5,578,632"]]
    # Q K^T and the weighted sum of V over N tokens of width d, 4 patch positions, per layer:
    # 2 * 4 * N^2 * d at 32x32 (N 256, d 64, 2 layers), 16x16 (64, 80, 4) and 8x8 (16, 96, 3).
    expected = sum(2 * 4 * n * n * d * layers for n, d, layers in ((256, 64, 2), (64, 80, 4), (16, 96, 3)))
    assert model_stats(MobileViT(variant="xxs"), 256)["attn_macs"] == expected


def test_cli_rejects_bad_widths():
    with pytest.raises(SystemExit):
        main(["--alphas", "0,1"])
