"""Datasets as TFDS random-access sources (array_record, no TensorFlow) and resumable batches.

Three embedded, offline datasets are TFDS builders: over files committed in `mssp_jax/data/`
(see its SOURCES.md), ``shakespeare_plays`` (16 plays and the sonnets as byte-level text; The
Tempest is the validation split) and ``uci_digits`` (1797 8x8 handwritten digits); generated
locally by the `mnist1d` package, ``mnist1d`` (Greydanus & Kobak 2024: 1-D digit signals of
length 40, 60,000 train / 10,000 validation, no download). Any other TFDS
dataset (``lm1b``, ``tiny_shakespeare``, ``cifar10``, ...) is read by name from ``data.data_dir``
once it has been prepared there; nothing is downloaded at run time.

A split is held in memory as arrays (`Examples`); `Batches` draws from it in an order fixed by
(seed, epoch), takes this process's slice of each global batch, and keeps an integer `position`
(batches consumed) that a checkpoint stores to resume mid-epoch exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from mssp_jax.scaling import ConfigError

EMBEDDED_DIR = Path(__file__).with_name("data")
TASKS = ("multiclass", "binary")


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder over files shipped in `EMBEDDED_DIR` (or generated locally): nothing to
    download, no checksums. A new embedded dataset subclasses it and joins `EMBEDDED`.

    (Declaring no URLs also keeps TFDS from probing the module path for a checksums file, which
    needs the optional `importlib_resources` package.)
    """

    url_infos = None

    def _log_download_bytes(self) -> None:
        """One line instead of TFDS's 'Downloading and preparing dataset Unknown size ...'."""
        print(f"preparing the embedded dataset {self.name} in {self.data_dir} (once, offline)",
              flush=True)

    def _log_download_done(self) -> None:
        """Nothing: TFDS would print 'downloaded and prepared' (nothing was downloaded)."""


class ShakespearePlays(EmbeddedBuilder):
    """Shakespeare (Project Gutenberg, public domain), one example per play, byte-level text."""

    VERSION = tfds.core.Version("1.0.0")
    VALIDATION_PLAYS = ("tempest",)

    def _info(self) -> tfds.core.DatasetInfo:
        # No shuffling on write: the records keep the play order, so the text reads as written.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text()}), disable_shuffling=True,
            homepage="https://www.gutenberg.org/", description=__doc__)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # the corpus ships with the package
        with tarfile.open(EMBEDDED_DIR / "shakespeare.tar.xz") as tar:
            plays = {Path(m.name).stem: tar.extractfile(m).read().decode()
                     for m in tar.getmembers() if m.isfile()}
        val = {k: v for k, v in plays.items() if k in self.VALIDATION_PLAYS}
        train = {k: v for k, v in plays.items() if k not in self.VALIDATION_PLAYS}
        return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

    def _generate_examples(self, plays: dict[str, str]) -> Iterator[tuple[str, dict]]:
        for name in sorted(plays):
            yield name, {"text": plays[name]}


class UciDigits(EmbeddedBuilder):
    """UCI optical-recognition handwritten digits (CC BY 4.0): 1797 8x8 images, pixels 0..16."""

    VERSION = tfds.core.Version("1.0.0")
    VALIDATION_EVERY = 5  # example i is in the validation split when i % 5 == 0

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10)}),
            homepage="https://doi.org/10.24432/C50P49", description=__doc__)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        rows = np.loadtxt(EMBEDDED_DIR / "digits.csv.gz", delimiter=",", dtype=np.uint8)
        is_val = np.arange(len(rows)) % self.VALIDATION_EVERY == 0
        return {"train": self._generate_examples(rows[~is_val]),
                "validation": self._generate_examples(rows[is_val])}

    def _generate_examples(self, rows: np.ndarray) -> Iterator[tuple[int, dict]]:
        for i, row in enumerate(rows):
            yield i, {"image": row[:64].reshape(8, 8, 1), "label": int(row[64])}


class Mnist1d(EmbeddedBuilder):
    """MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024;
    Apache-2.0): the package's 10 digit templates padded, scaled, sheared, translated and noised
    into length-40 signals, generated here with its default transform (seed 42), so it is
    large enough for long online training and needs no download."""

    VERSION = tfds.core.Version("1.0.0")
    NUM_TRAIN, NUM_VALIDATION = 60_000, 10_000

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(40, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10)}),
            homepage="https://github.com/greydanus/mnist1d", description=__doc__)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.train_split = self.NUM_TRAIN + self.NUM_VALIDATION, 1.0
        d = make_dataset(args)  # one standardised set (its own mean / std), then split
        x, y = d["x"].astype(np.float32)[..., None], d["y"].astype(np.int64)
        n = self.NUM_TRAIN
        return {"train": self._generate_examples(x[:n], y[:n]),
                "validation": self._generate_examples(x[n:], y[n:])}

    def _generate_examples(self, x: np.ndarray, y: np.ndarray) -> Iterator[tuple[int, dict]]:
        for i in range(len(y)):
            yield i, {"image": x[i], "label": int(y[i])}


EMBEDDED = {"shakespeare_plays": ShakespearePlays, "uci_digits": UciDigits, "mnist1d": Mnist1d}


@contextlib.contextmanager
def _scratch_tempdir() -> Iterator[None]:
    """Temporary files in a folder removed on exit: a TFDS builder of a dataset not yet prepared
    makes an empty /tmp/tmp*tfds folder (DatasetInfo.initialize_from_bucket) and leaves it."""
    with tempfile.TemporaryDirectory() as scratch:
        previous, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous


def builder(name: str, data_dir: str = "") -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` in `data_dir` ('': TFDS's data directory, $TFDS_DATA_DIR or
    else ~/tensorflow_datasets), prepared: embedded ones are built there on first use, offline."""
    data_dir = data_dir or None
    if name in EMBEDDED:
        with _scratch_tempdir():
            b = EMBEDDED[name](data_dir=data_dir, file_format="array_record")
        if not b.data_path.exists():  # (is_prepared() would log a warning about the new folder)
            tfds.disable_progress_bar()
            b.download_and_prepare()  # seconds, once per data directory
        return b
    how = (f"prepare it once on a machine with network access: `tfds build {name} "
           f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record` "
           "(TFDS's builders need tensorflow to download), then pass --config.data.data_dir")
    try:
        with _scratch_tempdir():
            b = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"data.name: TFDS has no dataset {name!r} (embedded: {list(EMBEDDED)}); "
                          f"if it needs tensorflow to load, {how}") from e
    if not (b.data_path.exists() and b.is_prepared()):
        raise ConfigError(f"data.name: dataset {name!r} is not prepared in {b.data_dir}; {how}")
    if b.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ConfigError(f"data.name: dataset {name!r} in {b.data_dir} is stored as "
                          f"{b.info.file_format.value}, random access needs array_record; {how}")
    return b


@dataclasses.dataclass(frozen=True)
class Examples:
    """A split in memory: `num` examples; `take(indices)` -> {'inputs', 'targets'} arrays."""

    num: int
    take: Callable[[np.ndarray], dict[str, np.ndarray]]


def text_examples(source: Any, seq_len: int, max_bytes: int) -> Examples:
    """Byte-level LM windows: the split's texts joined by newlines (up to `max_bytes`) cut into
    non-overlapping windows of seq_len + 1 bytes; inputs = window[:-1], targets = window[1:]."""
    texts, size = [], 0
    for i in range(len(source)):
        texts.append(source[i]["text"])
        size += len(texts[-1]) + 1
        if size >= max_bytes:
            break
    stream = np.frombuffer(b"\n".join(texts)[:max_bytes], dtype=np.uint8)
    num = (len(stream) - 1) // seq_len
    offsets = np.arange(seq_len + 1)

    def take(idx: np.ndarray) -> dict[str, np.ndarray]:
        windows = stream[idx[:, None] * seq_len + offsets].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    return Examples(num, take)


def _images(source: Any) -> tuple[np.ndarray, np.ndarray]:
    rows = source.__getitems__(list(range(len(source))))
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows], np.int32)


def image_examples(source: Any, train_source: Any, task: str) -> Examples:
    """Flattened images standardised per channel with the train split's statistics.

    'multiclass': integer labels. 'binary' (the reference's two-class task): classes 0 and 1 only,
    scalar targets -1 / +1 for an MSE readout with one output.
    """
    images, labels = _images(source)
    train_images = _images(train_source)[0].astype(np.float64)
    axes = tuple(range(train_images.ndim - 1))
    mean, std = train_images.mean(axes), train_images.std(axes) + 1e-8
    inputs = ((images - mean) / std).reshape(len(images), -1).astype(np.float32)
    targets = labels
    if task == "binary":
        keep = labels < 2
        inputs, targets = inputs[keep], (2.0 * labels[keep] - 1.0).astype(np.float32)
    return Examples(len(targets), lambda idx: {"inputs": inputs[idx], "targets": targets[idx]})


def load(config: Any, split: str) -> Examples:
    """The examples of `split` of the config's dataset, as the config's model consumes them."""
    d = config.data
    b = builder(d.name, d.data_dir)
    source = b.as_data_source(split=split)
    if config.model == "transformer_moe":
        return text_examples(source, config.seq_len, d.max_bytes)
    return image_examples(source, b.as_data_source(split=d.train_split), d.task)


class Batches:
    """Deterministic, resumable, process-sharded batches of `examples`.

    The global example stream visits a fresh permutation of the split every epoch, drawn from
    (seed, epoch) (or the split's own order when shuffle=False). Batch number `position` holds
    stream items position*B .. position*B+B-1; process p of P keeps items p*B/P .. (p+1)*B/P.
    """

    def __init__(self, examples: Examples, global_batch: int, seed: int, *, shuffle: bool = True,
                 position: int = 0, process_index: int | None = None,
                 process_count: int | None = None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ConfigError(f"batch_size ({global_batch}) must be divisible by the number of "
                              f"processes ({self.process_count})")
        if examples.num < 1:
            raise ConfigError("data: the split has no examples "
                              "(for text: fewer bytes than seq_len)")
        self.examples, self.global_batch = examples, global_batch
        self.seed, self.shuffle = seed, shuffle
        self.position = position
        self._perms: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = self.examples.num
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(n) if self.shuffle else np.arange(n)}
        return self._perms[epoch]

    def indices(self, position: int) -> np.ndarray:
        """Example indices of this process's share of batch number `position`."""
        local = self.global_batch // self.process_count
        start = position * self.global_batch + self.process_index * local
        items = np.arange(start, start + local)
        epochs, offsets = np.divmod(items, self.examples.num)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)])

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.examples.take(self.indices(self.position))
        self.position += 1
        return batch


def validate(config: Any) -> None:
    """Checks the data fields against the dataset's metadata before any compute."""
    d = config.data
    for field in ("name", "train_split", "eval_split"):
        if not isinstance(d.get(field), str) or not d.get(field):
            raise ConfigError(f"data.{field} must be a non-empty string, got {d.get(field)!r}")
    info = builder(d.name, d.data_dir).info
    for field in ("train_split", "eval_split"):
        if d[field] not in info.splits:
            raise ConfigError(f"data.{field} must be one of {list(info.splits)} for {d.name!r}, "
                              f"got {d[field]!r}")
    features = info.features
    if config.model == "transformer_moe":
        if "text" not in features:
            raise ConfigError("data.name: transformer_moe needs a text dataset "
                              f"(a 'text' feature); {d.name!r} has {list(features)}")
        if config.vocab_size != 256:
            raise ConfigError(f"vocab_size must be 256 (byte-level text), got {config.vocab_size}")
        if config.seq_len < 1 or d.max_bytes < config.seq_len + 1:
            raise ConfigError(f"seq_len must be >= 1 and data.max_bytes > seq_len; got seq_len="
                              f"{config.seq_len}, data.max_bytes={d.max_bytes}")
        return
    if "image" not in features or "label" not in features:
        raise ConfigError(f"data.name: mlp_moe needs an image classification dataset ('image' and "
                          f"'label' features); {d.name!r} has {list(features)}")
    if d.task not in TASKS:
        raise ConfigError(f"data.task must be one of {list(TASKS)}, got {d.task!r}")
    input_dim = int(np.prod(features["image"].shape))
    outputs = 1 if d.task == "binary" else features["label"].num_classes
    if config.input_dim != input_dim:
        raise ConfigError(f"input_dim must be {input_dim} for {d.name!r} (image shape "
                          f"{features['image'].shape}), got {config.input_dim}")
    if config.num_classes != outputs:
        raise ConfigError(f"num_classes (model outputs) must be {outputs} for {d.name!r} with "
                          f"data.task={d.task!r}, got {config.num_classes}")
    if d.task == "binary" and config.loss != "mse":
        raise ConfigError("loss must be 'mse' for data.task='binary' (+-1 targets), "
                          f"got {config.loss!r}")
