"""The data stage: reading IDX files, checking them, and every way they can be wrong."""

import contextlib
import gzip

import numpy as np
import pytest
from conftest import SHARED, make_dataset, write_idx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fashion_mnist_cnn as fm

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("gzipped", [True, False])
def test_loads_generated_files(tmp_path, gzipped):
    make_dataset(tmp_path, n_train=30, n_test=20, gzipped=gzipped)
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(tmp_path)
    assert x_train.shape == (30, 28, 28) and x_test.shape == (20, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert sorted(set(y_train.tolist())) == list(range(10))
    assert x_train.max() == 255


def test_validation_split_is_random_but_fixed_by_the_seed():
    labels = np.arange(100) // 10  # sorted by class, like the shared sample
    fit, held_out = fm.split_validation(100, 0.2, seed=1)
    assert len(fit) == 80 and len(held_out) == 20
    assert sorted(fit.tolist() + held_out.tolist()) == list(range(100))
    assert len(set(labels[held_out].tolist())) > 2  # not just the last classes
    assert np.array_equal(fm.split_validation(100, 0.2, seed=1)[1], held_out)
    assert not np.array_equal(fm.split_validation(100, 0.2, seed=2)[1], held_out)


def test_split_that_leaves_nothing_is_refused():
    with pytest.raises(fm.UserError, match="no training or no validation"):
        fm.split_validation(3, 0.9, seed=0)


def corrupt(tmp_path, name, data):
    """A good small data set with one file replaced by raw bytes."""
    make_dataset(tmp_path, n_train=20, n_test=10)
    (tmp_path / name).write_bytes(data)
    return tmp_path


def gz_idx(magic_and_dims, payload):
    return gzip.compress(magic_and_dims + payload)


def header(ndim, *dims):
    return bytes([0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    "name, data, message",
    [
        (TRAIN_IMAGES, b"", "magic missing"),
        (TRAIN_IMAGES, b"\x1f\x8b\x08\x00garbage", "not a valid gzip file"),
        (TRAIN_IMAGES, gzip.compress(header(3, 20, 28, 28) + bytes(784 * 20))[:-30], "gzip"),
        (TRAIN_IMAGES, gz_idx(header(1, 20), bytes(20)), "not an IDX image file"),
        (TRAIN_LABELS, gz_idx(header(3, 20, 28, 28), bytes(784 * 20)), "not an IDX label file"),
        (TRAIN_IMAGES, gz_idx(bytes([0, 0, 8, 3, 0, 0]), b""), "truncated IDX header"),
        (TRAIN_IMAGES, gz_idx(header(3, 20, 32, 32), bytes(1024 * 20)), "not 28x28"),
        (TRAIN_IMAGES, gz_idx(header(3, 20, 28, 28), bytes(784 * 19)), "is truncated"),
        (TRAIN_IMAGES, gz_idx(header(3, 20, 28, 28), bytes(784 * 21)), "bytes past the end"),
        (TRAIN_IMAGES, gz_idx(header(3, 0, 28, 28), b""), "holds no images"),
        (TRAIN_IMAGES, gz_idx(header(3, 21, 28, 28), bytes(784 * 21)), "21 images but .*20 labels"),
        (TRAIN_LABELS, gz_idx(header(1, 20), bytes([3] * 19 + [10])), "label 10 found"),
        # A header that claims four billion images must not make us allocate for them.
        (TRAIN_IMAGES, gz_idx(header(3, 2**32 - 1, 28, 28), bytes(784)), "is truncated"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, name, data, message):
    with pytest.raises(fm.UserError, match=message):
        fm.load_fashion_mnist(corrupt(tmp_path, name, data))


def test_raw_file_can_be_truncated_too(tmp_path):
    make_dataset(tmp_path, n_train=20, n_test=10, gzipped=False)
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-1])
    with pytest.raises(fm.UserError, match="is truncated"):
        fm.load_fashion_mnist(tmp_path)


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(fm.UserError, match="no such folder"):
        fm.load_fashion_mnist(tmp_path / "nowhere")
    make_dataset(tmp_path, n_train=20, n_test=10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(fm.UserError, match="t10k-labels-idx1-ubyte.gz is missing"):
        fm.load_fashion_mnist(tmp_path)


def test_folder_in_place_of_a_file(tmp_path):
    make_dataset(tmp_path, n_train=20, n_test=10)
    (tmp_path / TRAIN_LABELS).unlink()
    (tmp_path / TRAIN_LABELS).mkdir()  # a folder where a file should be
    with pytest.raises(fm.UserError, match="is missing"):
        fm.load_fashion_mnist(tmp_path)


def test_official_size_with_wrong_checksum_is_refused(tmp_path):
    make_dataset(tmp_path, n_train=20, n_test=10)
    size, _ = fm.OFFICIAL_FILES[TRAIN_LABELS]
    (tmp_path / TRAIN_LABELS).write_bytes(bytes(size))
    with pytest.raises(fm.UserError, match="checksum mismatch"):
        fm.load_fashion_mnist(tmp_path)


def test_unofficial_data_says_so_once(tmp_path, capsys):
    make_dataset(tmp_path, n_train=20, n_test=10)
    fm.load_fashion_mnist(tmp_path)
    out = capsys.readouterr().out
    assert out.count("not the official Fashion-MNIST") == 1


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/fashion-mnist absent")


@needs_shared
@pytest.mark.parametrize("name", [TRAIN_LABELS, "t10k-labels-idx1-ubyte.gz"])
def test_checksum_verifier_accepts_the_official_label_files(tmp_path, name):
    official = SHARED / "official-labels" / name
    assert fm.is_official(official, name)
    damaged = tmp_path / name
    data = bytearray(official.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte different
    damaged.write_bytes(bytes(data))
    with pytest.raises(fm.UserError, match="checksum mismatch"):
        fm.is_official(damaged, name)


@needs_shared
def test_official_labels_read_as_60000_and_10000(tmp_path):
    labels = fm.read_idx(SHARED / "official-labels" / TRAIN_LABELS, fm.IDX_LABELS)
    assert labels.shape == (60_000,) and np.bincount(labels).tolist() == [6000] * 10
    test = fm.read_idx(SHARED / "official-labels" / "t10k-labels-idx1-ubyte.gz", fm.IDX_LABELS)
    assert test.shape == (10_000,)


@needs_shared
def test_shared_sample_loads_as_real_fashion_mnist():
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(SHARED / "sample")
    assert x_train.shape == (600, 28, 28) and x_test.shape == (300, 28, 28)
    assert np.bincount(y_train).tolist() == [60] * 10


# Fuzzing: whatever bytes arrive, the reader returns an array or raises its own UserError.


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=3000), gzipped=st.booleans())
def test_fuzz_random_bytes(tmp_path, data, gzipped):
    path = tmp_path / "fuzz"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    for magic in (fm.IDX_IMAGES, fm.IDX_LABELS):
        with contextlib.suppress(fm.UserError):
            fm.read_idx(path, magic)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ndim=st.integers(0, 255),
    dims=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    payload=st.integers(0, 4000),
    cut=st.integers(0, 64),
)
def test_fuzz_headers_and_truncations(tmp_path, ndim, dims, payload, cut):
    data = bytes([0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(payload)
    path = tmp_path / "fuzz.gz"
    path.write_bytes(gzip.compress(data)[: -cut or None])
    for magic in (fm.IDX_IMAGES, fm.IDX_LABELS):
        try:
            array = fm.read_idx(path, magic)
        except fm.UserError:
            continue
        assert array.dtype == np.uint8 and array.size > 0


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(0, 2**32 - 1) | st.integers(0, 6),
    height=st.sampled_from([28, 28, 28, 27, 0]),
    width=st.sampled_from([28, 28, 28, 29, 0]),
    extra=st.integers(-800, 800),
    gzipped=st.booleans(),
)
def test_fuzz_image_files_with_plausible_headers(tmp_path, count, height, width, extra, gzipped):
    # Mostly three-dimensional 28x28 headers, which random headers almost never are, with a
    # payload near what they promise: the image path's own checks, not the header's, are hit.
    promised = min(count, 8) * height * width
    data = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (count, height, width))
    data += bytes(np.random.default_rng(count).integers(0, 256, max(0, promised + extra), np.uint8))
    path = tmp_path / "fuzz.gz"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    try:
        array = fm.read_idx(path, fm.IDX_IMAGES)
    except fm.UserError:
        return
    assert array.shape == (count, 28, 28) and extra == 0 and count > 0


def test_an_idx_file_that_cannot_be_read(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(fm.UserError, match="could not be read"):
        fm.read_idx(tmp_path / "folder", fm.IDX_LABELS)


def test_a_label_file_that_holds_no_labels(tmp_path):
    write_idx(tmp_path / TRAIN_LABELS, np.zeros(0))
    with pytest.raises(fm.UserError, match="holds no labels"):
        fm.read_idx(tmp_path / TRAIN_LABELS, fm.IDX_LABELS)


def test_good_file_survives_a_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(fm.read_idx(tmp_path / "x.gz", fm.IDX_IMAGES), images)
    write_idx(tmp_path / "y.gz", images, gzipped=False)
    assert np.array_equal(fm.read_idx(tmp_path / "y", fm.IDX_IMAGES), images)


# The complete official files, where ../shared/fashion-mnist/full/ has them.

FULL = SHARED / "full"
needs_full = pytest.mark.skipif(not FULL.is_dir(), reason="../shared/fashion-mnist/full absent")


@needs_full
def test_the_official_files_are_recognised_as_official(capsys):
    for name in fm.OFFICIAL_FILES:
        assert fm.is_official(FULL / name, name)
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(FULL)
    assert x_train.shape == (60_000, 28, 28) and x_test.shape == (10_000, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert "not the official" not in capsys.readouterr().out


@needs_full
@pytest.mark.parametrize("name", list(fm.OFFICIAL_FILES))
def test_an_official_file_with_one_byte_changed_is_refused(tmp_path, name):
    for other in fm.OFFICIAL_FILES:
        (tmp_path / other).symlink_to(FULL / other)
    (tmp_path / name).unlink()
    data = bytearray((FULL / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(fm.UserError, match=f"{name}: checksum mismatch"):
        fm.load_fashion_mnist(tmp_path)
