"""Opening TFDS splits: one-line errors before anything heavy, sizes, shares and step counts."""

import pytest

from mvit2_jax import data
from mvit2_jax.data import digits, sources
from mvit2_jax.errors import DataError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "tfds"  # shared by every test module of the session
    data.check_split(digits.NAME, "train", str(path))
    return str(path)


def test_imagenet_not_prepared_says_where_the_manual_tars_go(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as info:  # a DataError: one line, exit 2
        data.check_split("imagenet2012", "train", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path}/downloads/manual/" in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message


def test_the_train_stream_fails_the_same_way_before_reading_anything(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError, match="downloads/manual"):
        data.labeled_train_stream(data.DatasetSpec("imagenet2012", str(tmp_path)), "train", image_size=32, batch_size=8)


def test_unknown_dataset_name_suggests_close_names(tmp_path):
    with pytest.raises(DataError, match=r"Unknown TFDS dataset 'imagenet2021'\. Did you mean imagenet2012"):
        data.check_split("imagenet2021", "train", str(tmp_path))


def test_unknown_split_lists_the_available_ones(digits_dir):
    with pytest.raises(DataError, match=r"mvit2_digits has no split 'validation' \(available: train, test\)"):
        data.check_split(digits.NAME, "validation", digits_dir)


def test_num_examples_understands_slices(digits_dir):
    assert data.num_examples(digits.NAME, "train[:10%]", digits_dir) == 144
    assert data.num_examples(digits.NAME, "test[:101]", digits_dir) == 101


@pytest.mark.parametrize("count", [1, 2, 3])
def test_process_shares_are_disjoint_and_cover_the_split(digits_dir, count):
    sizes = [
        int(data.load_split(digits.NAME, sources.process_split("test[:101]", i, count), digits_dir).cardinality())
        for i in range(count)
    ]
    assert sum(sizes) == 101 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="process_index"):
        sources.process_split("test", count, count)


def test_step_counts():
    assert data.steps_per_epoch(1_281_167, 1024) == 1251
    assert data.steps_per_epoch(1437, 64) == 22
    assert data.eval_steps(50_000, 125, process_count=4) == 100
    assert data.eval_steps(97, 16, process_count=2) == 4  # shares of 49 and 48 examples
    assert data.eval_steps(360, 1000) == 1
