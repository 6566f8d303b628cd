"""Image-folder datasets: layouts, labels, the seeded ratio split, bad files, errors, streams."""

import collections
import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mvit2_jax import data
from mvit2_jax.data import digits, folder
from mvit2_jax.errors import ConfigError, DataError

NO_AUGMENTATION = data.TrainAugmentation(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, randaugment=False, erasing_prob=0.0
)
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP"}
_unique = itertools.count()


def _image(path, size=(20, 16)):
    """A small random image, different from every other one, in the format of its extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(next(_unique))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=FORMATS[os.path.splitext(path)[1].lower()])


def _images(folder_path, count, ext=".jpg"):
    for i in range(count):
        _image(os.path.join(folder_path, f"{i:03d}{ext}"))


def _text(path, content="hello\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)


def spec(root, data_dir, **options):
    """The folder at `root` as a dataset, with folder options (what config.data gives a run)."""
    return data.DatasetSpec(root, data_dir, data.FolderOptions(**options))


ABC = {"val_fraction": 0.2, "seed": 0}  # the class_folders fixture's options


def _examples(dataset, split):
    ds = data.load_split(dataset, split, decoders={"image": tfds.decode.SkipDecoding()})
    return [
        {k: (v.decode() if isinstance(v, bytes) and k == "file_name" else v) for k, v in ex.items()}
        for ex in tfds.as_numpy(ds)
    ]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("folder_tfds"))


@pytest.fixture(scope="module")
def split_folders(tmp_path_factory):
    """ROOT/train/{cat: 4 + 1 nested, dog: 3, eel: 3 formats}, ROOT/val/{cat: 2, dog: 1}."""
    root = str(tmp_path_factory.mktemp("pets"))
    _images(f"{root}/train/cat", 4, ".jpg")
    _image(f"{root}/train/cat/more/extra.JPEG")
    _images(f"{root}/train/dog", 3, ".png")
    for ext in (".bmp", ".gif", ".webp"):
        _image(f"{root}/train/eel/e{ext}")
    _images(f"{root}/val/cat", 2, ".jpg")
    _images(f"{root}/val/dog", 1, ".png")
    _text(f"{root}/train/README")  # belongs to no class: ignored
    return root


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """ROOT/{a: 20, b: 10, c: 3} with a validation fraction of 0.2: 7 validation images."""
    root = str(tmp_path_factory.mktemp("abc"))
    for name, count in [("a", 20), ("b", 10), ("c", 3)]:
        _images(f"{root}/{name}", count)
    return root


def test_split_folders_are_the_splits_and_sorted_class_folders_the_labels(split_folders, tfds_dir):
    pets = spec(split_folders, tfds_dir)
    builder = data.get_builder(pets)
    assert builder.name.startswith("folder_")
    assert data.class_names(pets) == ["cat", "dog", "eel"]
    assert data.num_examples(pets, "train") == 11
    assert data.num_examples(pets, "val") == 3
    assert set(data.get_builder(pets).info.splits) == {"train", "val"}
    for split in ("train", "val"):
        for ex in _examples(pets, split):
            assert ex["file_name"].split("/")[:2] == [split, ["cat", "dog", "eel"][ex["label"]]]
    assert "train/cat/more/extra.JPEG" in {ex["file_name"] for ex in _examples(pets, "train")}
    assert data.skipped_files(pets) == {}
    with pytest.raises(DataError, match=r"has no split 'validation' \(available: train, val\)"):
        data.check_split(pets, "validation")


def test_images_are_stored_as_the_original_file_bytes(split_folders, tfds_dir):
    for ex in _examples(spec(split_folders, tfds_dir), "train"):
        with open(os.path.join(split_folders, ex["file_name"]), "rb") as f:
            assert ex["image"] == f.read()  # JPEGs stay JPEGs: the fused decode-and-crop applies


def test_class_folders_alone_get_a_stratified_train_validation_split(class_folders, tfds_dir):
    abc = spec(class_folders, tfds_dir, **ABC)
    assert data.class_names(abc) == ["a", "b", "c"]
    train = _examples(abc, "train")
    validation = _examples(abc, "validation")
    assert (len(train), len(validation)) == (26, 7)
    assert collections.Counter(ex["label"] for ex in validation) == {0: 4, 1: 2, 2: 1}
    train_files = {ex["file_name"] for ex in train}
    validation_files = {ex["file_name"] for ex in validation}
    assert not train_files & validation_files and len(train_files | validation_files) == 33
    assert all(ex["file_name"].startswith("abc"[ex["label"]] + "/") for ex in train + validation)


def test_the_ratio_split_is_a_stable_function_of_the_seed():
    files = [
        (f"{c}/{i}.jpg", label)
        for label, (c, n) in enumerate([("a", 20), ("b", 10), ("c", 3), ("d", 1)])
        for i in range(n)
    ]
    split = folder.split_by_ratio(files, 4, 0.2, seed=0)
    assert split == folder.split_by_ratio(files[::-1], 4, 0.2, seed=0)
    assert split["validation"] != folder.split_by_ratio(files, 4, 0.2, seed=1)["validation"]
    assert sorted(split["train"] + split["validation"]) == sorted(files)
    assert len(split["validation"]) == 7  # round(0.2 * 34); the lone "d" image stays in train
    assert ("d/0.jpg", 3) in split["train"]
    grown = folder.split_by_ratio(files + [("a/new.jpg", 0)], 4, 0.2, seed=0)
    assert len(set(grown["validation"]) ^ set(split["validation"])) <= 2  # at most one file moved


def test_other_options_or_other_files_prepare_another_copy(tmp_path, tfds_dir):
    root = str(tmp_path / "grow")
    _images(f"{root}/a", 10)
    _images(f"{root}/b", 10)
    first = data.get_builder(root, tfds_dir).name
    assert data.num_examples(root, "validation", tfds_dir) == 2
    assert data.get_builder(spec(root, tfds_dir, seed=1)).name != first
    assert data.get_builder(spec(root, tfds_dir)).name == first  # the default options again
    _images(f"{root}/c", 10)
    assert data.get_builder(root, tfds_dir).name != first
    assert data.num_examples(root, "train", tfds_dir) + data.num_examples(root, "validation", tfds_dir) == 30


@pytest.fixture
def with_bad_files(tmp_path):
    root = str(tmp_path / "bad")
    _images(f"{root}/train/cat", 3)
    _images(f"{root}/val/cat", 1)
    with open(f"{root}/train/cat/000.jpg", "rb") as f:
        jpeg = f.read()
    with open(f"{root}/train/cat/broken.jpg", "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])
    _text(f"{root}/train/cat/x.jpg")
    _text(f"{root}/train/cat/notes.txt")
    _text(f"{root}/train/cat/.DS_Store")  # hidden: ignored, not a bad file
    return root


def test_bad_files_are_skipped_logged_and_recorded(with_bad_files, tfds_dir):
    assert data.num_examples(with_bad_files, "train", tfds_dir) == 3
    skipped = data.skipped_files(with_bad_files, tfds_dir)
    assert sorted(skipped) == ["train/cat/broken.jpg", "train/cat/notes.txt", "train/cat/x.jpg"]
    assert "not a decodable image" in skipped["train/cat/broken.jpg"]
    assert "not an image file extension" in skipped["train/cat/notes.txt"]


@pytest.mark.parametrize("bad", ["broken.jpg", "x.jpg", "notes.txt"])
def test_bad_files_fail_preparation_with_on_bad_file_error(with_bad_files, tfds_dir, bad):
    for other in {"broken.jpg", "x.jpg", "notes.txt"} - {bad}:
        os.remove(f"{with_bad_files}/train/cat/{other}")
    strict = spec(with_bad_files, tfds_dir, on_bad_file="error")
    with pytest.raises(data.BadImageError) as info:
        data.check_split(strict, "train")
    assert str(info.value).startswith(f"{with_bad_files}/train/cat/{bad}: ") and "\n" not in str(info.value)
    assert isinstance(info.value, DataError)
    assert not data.get_builder(strict).is_prepared()


def _mixed(root):
    _images(f"{root}/train/a", 1)
    _images(f"{root}/cats", 1)


def _val_class_not_in_train(root):
    _images(f"{root}/train/a", 1)
    _images(f"{root}/val/a", 1)
    _images(f"{root}/val/zebra", 1)


def _empty_split(root):
    _images(f"{root}/train/a", 2)
    os.makedirs(f"{root}/val/a")
    _text(f"{root}/val/a/notes.txt")


def _all_bad_split(root):
    _images(f"{root}/train/a", 2)
    _text(f"{root}/val/a/x.jpg")


@pytest.mark.parametrize(
    "make,path,message",
    [
        (None, "missing", r"dataset folder \S+/missing does not exist"),
        (lambda r: _text(r), "", r"is a file, not a directory"),
        (lambda r: _text(f"{r}/loose.jpg"), "", r"has no class sub-folders"),
        (_mixed, "", r"mixes split folders \(train\) with other folders \(cats\)"),
        (_val_class_not_in_train, "", r"/val/zebra has no matching \S+/train/zebra"),
        (_empty_split, "", r"/val has no images \(jpg, jpeg, png, bmp, gif, webp\)"),
        (lambda r: os.makedirs(f"{r}/a"), "", r"has no images"),
        (lambda r: _images(f"{r}/a", 4), "", r"leaves the validation split empty"),
        (_all_bad_split, "", r"every image of split 'val' is bad"),
    ],
)
def test_unusable_folders_fail_with_one_line_saying_what_to_change(tmp_path, tfds_dir, make, path, message):
    root = str(tmp_path / "ds")
    if make is not None:
        make(root)
    name = str(tmp_path / path) if path else root
    with pytest.raises(folder.FolderError, match=message) as info:
        data.check_split(name, "val", tfds_dir)
    assert "\n" not in str(info.value) and isinstance(info.value, DataError)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_validation_fraction_must_be_in_the_open_unit_interval(fraction):
    with pytest.raises(ConfigError, match=r"config.data.folder_val_fraction\) must be in \(0, 1\)"):
        data.FolderOptions(val_fraction=fraction)


def test_names_that_are_not_folders_still_go_to_tfds(tmp_path):
    assert not data.is_folder_dataset("imagenette/320px-v2") and not data.is_folder_dataset("cifar10")
    assert data.is_folder_dataset("~/pets") and data.is_folder_dataset("./pets")
    with pytest.raises(
        DataError, match=r"Unknown TFDS dataset 'no/such_thing'\..* No directory \S+/no/such_thing exists"
    ):
        data.get_builder("no/such_thing", str(tmp_path))


def test_class_names_of_tfds_datasets_without_preparing_them(tmp_path):
    assert data.class_names(digits.NAME, str(tmp_path)) == [str(d) for d in range(10)]
    names = data.class_names("imagenet2012", str(tmp_path))
    assert len(names) == 1000 and names[0] == "n01440764"


def test_train_and_eval_streams_run_on_a_folder(class_folders, tfds_dir):
    abc = spec(class_folders, tfds_dir, **ABC)
    it = data.as_numpy(data.labeled_train_stream(abc, "train", batch_size=8, image_size=16, augmentation=NO_AUGMENTATION))
    batches = [next(it) for _ in range(4)]  # 3 steps per epoch: into the second epoch
    assert batches[0]["image"].shape == (8, 16, 16, 3) and batches[0]["label"].shape == (8,)
    assert all(set(b["label"]) <= {0, 1, 2} for b in batches)

    def fingerprints(batches):
        return collections.Counter(
            (image.tobytes(), int(label))
            for b in batches
            for image, label, mask in zip(b["image"], b["label"], b["mask"])
            if mask
        )

    kwargs = {"batch_size": 3, "image_size": 16, "resize_size": 16}
    whole = list(data.as_numpy(data.labeled_eval_pass(abc, "validation", **kwargs)))
    shares = [
        list(data.as_numpy(data.labeled_eval_pass(abc, "validation", process_index=i, process_count=2, **kwargs)))
        for i in range(2)
    ]
    assert [b["mask"].sum() for b in whole] == [3, 3, 1]
    assert len(fingerprints(whole)) == 7 and set(fingerprints(whole).values()) == {1}  # each example once
    assert fingerprints(shares[0]) + fingerprints(shares[1]) == fingerprints(whole)
    assert collections.Counter(y for b in whole for y, m in zip(b["label"], b["mask"]) if m) == {0: 4, 1: 2, 2: 1}
