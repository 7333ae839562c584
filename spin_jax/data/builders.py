"""TFDS builders without TensorFlow: prepared as array_record, read with `as_data_source()`.

`load_split` is the one entry point: it prepares a data set into `data_dir` once (a later call
reuses the prepared files) and returns a random-access sequence of plain-python dicts:
    {"id", "prompt", "response": str, "messages": [{"role", "content"}, ...]}
The skip counts of a source are kept with the prepared data: `builder.info.metadata["stats"]`.

Nothing here may touch TensorFlow: no `as_dataset`, no tfrecord.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from spin_jax.data import sources

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
JSON_FIELDS = ("messages",)  # stored as JSON text, decoded by load_split


def load_split(name: str, data_dir: str, split: str, manual_dir: str | None = None,
               max_bad_fraction: float = 0.0) -> "Rows":
    """Prepare `name` into `data_dir` if needed and return `split` as a sequence of dicts.

    name: "sharegpt" (split "train"; manual_dir optionally a directory/file with the ShareGPT JSON),
          "ultrachat_200k" (splits "train_sft", "test_sft"; manual_dir = a local copy of the Hub
          data set, or a Hub data set id to download it from; unset: HuggingFaceH4/ultrachat_200k).
    split may be a TFDS slice such as "train[:98%]". Use one data_dir per source file; the
    prepared copy is reused as is. Several hosts sharing a data_dir: prepare on one first.
    """
    builder = make_builder(name, data_dir, manual_dir, max_bad_fraction)
    prepare(builder, manual_dir)
    base = split.split("[", 1)[0]
    if base not in builder.info.splits:
        raise ValueError(f"{name}: no split {base!r} in the prepared data at {builder.data_dir}; "
                         f"available: {', '.join(builder.info.splits)}")
    return Rows(builder.as_data_source(split))


def make_builder(name: str, data_dir: str, manual_dir: str | None = None,
                 max_bad_fraction: float = 0.0) -> tfds.core.GeneratorBasedBuilder:
    if name == "sharegpt":
        return Sharegpt(data_dir=data_dir, source_path=manual_dir, max_bad_fraction=max_bad_fraction)
    if name == "ultrachat_200k":
        return Ultrachat200k(data_dir=data_dir, max_bad_fraction=max_bad_fraction)
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(BUILDERS)}")


def prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str | None = None) -> None:
    """download_and_prepare as array_record (no-op when already prepared)."""
    if builder.is_prepared():
        return
    if isinstance(builder, Ultrachat200k):
        manual_dir = _ultrachat_dir(manual_dir)
        sources.ultrachat_files(manual_dir, "train_sft")  # a clear error before TFDS's own
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)


def _ultrachat_dir(manual_dir: str | None) -> str:
    """manual_dir if it is a local directory, else the Hub snapshot of the data set it names
    (HuggingFaceH4/ultrachat_200k when unset): only the parquet files of the splits used."""
    from spin_jax.io import hub

    if manual_dir is not None and not hub.is_hub_id(manual_dir):
        return manual_dir
    spec = manual_dir or sources.ULTRACHAT_REPO
    log.info(f"ultrachat_200k: downloading {spec}'s {' and '.join(Ultrachat200k.SPLITS)} parquet files from the Hub")
    return hub.download_dataset(spec, [f"data/{split}-*.parquet" for split in Ultrachat200k.SPLITS])


class Rows(Sequence):
    """A random-access view of a TFDS data source that yields dicts of python values."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return to_python(self.source[index])


def to_python(record: dict) -> dict:
    """Text features (bytes) -> str, JSON fields -> objects."""
    out = {}
    for key, value in record.items():
        value = value.decode("utf-8") if isinstance(value, bytes) else value
        out[key] = json.loads(value) if key in JSON_FIELDS else value
    return out


# ---------------------------------------------------------------------------------------- builders

CHAT_FEATURES = dict(id=tfds.features.Text(), prompt=tfds.features.Text(),
                     response=tfds.features.Text(), messages=tfds.features.Text())


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads local files only (no downloads, no checksums)."""

    # TFDS 4.9.10 computes `code_path` (used only to find download checksum files) through
    # `importlib_resources`, which it installs only for Python < 3.9 and which is absent here:
    # the property fails for any builder defined in a package. Nothing here is downloaded.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")


class _ChatBuilder(_LocalBuilder, skip_registration=True):
    """Shared parts: plain chat features, skip counts in info.metadata["stats"]."""

    RELEASE_NOTES = {"1.0.0": "First turn pairs and the full conversation (messages as JSON)."}

    def __init__(self, *, max_bad_fraction: float = 0.0, **kwargs):
        self.max_bad_fraction = max_bad_fraction
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=tfds.features.FeaturesDict(CHAT_FEATURES),
                                     metadata=tfds.core.MetadataDict())

    def _generate_examples(self, rows, stats, split):
        for row in rows:
            yield row["id"], dict(row, messages=json.dumps(row["messages"], ensure_ascii=False))
        self.info.metadata.setdefault("stats", {})[split] = dict(stats)


class Sharegpt(_ChatBuilder, skip_registration=True):
    """ShareGPT V3 (unfiltered, cleaned, split): human -> gpt first turns, one split 'train'."""

    name = "sharegpt"

    def __init__(self, *, source_path: str | None = None, **kwargs):
        self.source_path = source_path
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        stats: dict = {}
        rows = sources.iter_sharegpt(self.source_path, stats, self.max_bad_fraction)
        return {"train": self._generate_examples(rows, stats, "train")}


class Ultrachat200k(_ChatBuilder, skip_registration=True):
    """HuggingFaceH4/ultrachat_200k, splits train_sft and test_sft, from a local download."""

    name = "ultrachat_200k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {sources.ULTRACHAT_REPO} (`huggingface-cli download {sources.ULTRACHAT_REPO} "
        "--repo-type dataset --local-dir <dir>`) and pass <dir> as manual_dir; the parquet files "
        "are read from <dir>/data/{train,test}_sft-*.parquet.")
    SPLITS = ("train_sft", "test_sft")

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        splits = {}
        for split in self.SPLITS:
            try:
                sources.ultrachat_files(manual, split)
            except FileNotFoundError:
                continue
            stats: dict = {}
            rows = sources.iter_ultrachat(manual, split, stats, self.max_bad_fraction)
            splits[split] = self._generate_examples(rows, stats, split)
        return splits


BUILDERS = {"sharegpt": Sharegpt, "ultrachat_200k": Ultrachat200k}
