"""Embedded TFDS datasets round-trip; batches are deterministic, sharded and resumable."""

import gzip
import logging
import sys
import tarfile
import tempfile

import numpy as np
import pytest

from configs import mlp_moe, transformer_moe
from mssp_jax import data
from mssp_jax.scaling import ConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_shakespeare_round_trip_without_tensorflow(data_dir):
    with tarfile.open(data.EMBEDDED_DIR / "shakespeare.tar.xz") as tar:
        plays = {m.name.split("/")[-1][:-4]: tar.extractfile(m).read()
                 for m in tar.getmembers() if m.isfile()}
    b = data.builder("shakespeare_plays", data_dir)
    train = b.as_data_source(split="train")
    val = b.as_data_source(split="validation")
    assert [val[i]["text"] for i in range(len(val))] == [plays["tempest"]]
    expected = [plays[k] for k in sorted(plays) if k != "tempest"]
    assert [train[i]["text"] for i in range(len(train))] == expected  # stored order kept
    assert b.info.file_format.value == "array_record"
    assert "tensorflow" not in sys.modules


def test_embedded_dataset_is_prepared_quietly_says_where_and_leaves_no_temp_files(
        tmp_path, capfd, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="absl")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # stands for /tmp
    b = data.builder("uci_digits", str(tmp_path / "data"))
    assert b.data_dir.startswith(str(tmp_path / "data" / "uci_digits"))
    assert list((tmp_path / "tmp").iterdir()) == []  # TFDS alone leaves an empty tmp*tfds
    out, err = capfd.readouterr()  # no "Downloading ... Unknown size", no absl warning
    assert out == f"preparing the embedded dataset uci_digits in {b.data_dir} (once, offline)\n"
    assert err == "" and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    data.builder("uci_digits", str(tmp_path / "data"))  # prepared: reused silently
    assert capfd.readouterr() == ("", "")


def test_digits_round_trip(data_dir):
    with gzip.open(data.EMBEDDED_DIR / "digits.csv.gz") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    val = data.builder("uci_digits", data_dir).as_data_source(split="validation")
    got = val.__getitems__(list(range(len(val))))
    expected = rows[::data.UciDigits.VALIDATION_EVERY]
    assert len(got) == len(expected) == 360
    assert {ex["label"] for ex in got} == set(range(10))
    for ex, row in zip(sorted(got, key=lambda e: e["image"].tobytes()),
                       sorted(expected, key=lambda r: r[:64].tobytes())):
        np.testing.assert_array_equal(ex["image"].reshape(-1), row[:64])


def _config(family, arg=None, data_dir=""):
    c = family.get_config(arg)
    c.data.data_dir = data_dir
    return c


def test_lm_batches_are_next_byte_windows(data_dir):
    c = _config(transformer_moe, data_dir=data_dir)
    examples = data.load(c, "validation")
    batch = next(data.Batches(examples, 4, seed=0))
    assert batch["inputs"].shape == (4, c.seq_len) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    text = data.builder("shakespeare_plays", data_dir).as_data_source(split="validation")[0]["text"]
    window = bytes(np.append(batch["inputs"][0], batch["targets"][0, -1]).astype(np.uint8))
    assert window in text


def test_binary_task_keeps_two_classes_as_plus_minus_one(data_dir):
    c = _config(mlp_moe, "task=binary", data_dir)
    data.validate(c)
    examples = data.load(c, "train")
    targets = examples.take(np.arange(examples.num))["targets"]
    assert set(np.unique(targets)) == {-1.0, 1.0}
    assert examples.num < 400  # digits 0 and 1 only, of 1437


def toy_examples(n=10):
    return data.Examples(n, lambda idx: {"inputs": idx, "targets": idx})


def test_order_is_seeded_and_each_epoch_is_a_permutation():
    def first(seed, k):
        batches = data.Batches(toy_examples(), 5, seed)
        return np.concatenate([next(batches)["inputs"] for _ in range(k)])

    a = first(0, 4)
    np.testing.assert_array_equal(a, first(0, 4))
    assert not np.array_equal(a, first(1, 4))
    assert sorted(a[:10]) == sorted(a[10:]) == list(range(10))
    assert not np.array_equal(a[:10], a[10:])  # a fresh order each epoch


def test_process_shards_partition_the_global_batch():
    whole = data.Batches(toy_examples(), 6, 3, process_index=0, process_count=1)
    shards = [data.Batches(toy_examples(), 6, 3, process_index=p, process_count=3)
              for p in range(3)]
    for _ in range(4):
        np.testing.assert_array_equal(next(whole)["inputs"],
                                      np.concatenate([next(s)["inputs"] for s in shards]))
    with pytest.raises(ConfigError, match="batch_size"):
        data.Batches(toy_examples(), 5, 0, process_index=0, process_count=2)


def test_resuming_from_a_position_continues_the_stream():
    batches = data.Batches(toy_examples(), 3, 7)
    stream = [next(batches)["inputs"] for _ in range(9)]
    assert batches.position == 9
    resumed = data.Batches(toy_examples(), 3, 7, position=5)
    for expected in stream[5:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], expected)


def test_unprepared_tfds_dataset_names_it_and_how_to_prepare(tmp_path):
    with pytest.raises(ConfigError, match=r"'tiny_shakespeare' is not prepared.*tfds build"):
        data.builder("tiny_shakespeare", str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("data.task", "ternary", "data.task must be one of"),
    ("input_dim", 3072, "input_dim must be 64"),
    ("num_classes", 10, "num_classes .* must be 1"),
    ("data.eval_split", "test", "data.eval_split must be one of"),
])
def test_bad_data_fields_are_named(data_dir, field, value, match):
    c = _config(mlp_moe, "task=binary", data_dir)
    parent, _, name = field.rpartition(".")
    (c[parent] if parent else c)[name] = value
    with pytest.raises(ConfigError, match=match):
        data.validate(c)


def test_lm_needs_a_text_dataset(data_dir):
    c = _config(transformer_moe, data_dir=data_dir)
    c.data.name = "uci_digits"
    with pytest.raises(ConfigError, match="needs a text dataset"):
        data.validate(c)
