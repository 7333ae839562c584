"""Hub ids through the real huggingface_hub download and upload code, against a stand-in of the
Hub on 127.0.0.1 (tests/fake_hub.py): models (cache, revisions, gated, 404, pickle-only, offline),
the ultrachat_200k data set, and `export --push-to-hub`."""

import json
import os

import jax
import numpy as np
import pytest

from spin_jax.errors import SpinError
from spin_jax.io import hub
from spin_jax.io.load import load_model, model_config_only
from spin_jax.model import transformer
from tests.fake_hub import set_offline


def files_of(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
            if os.path.isfile(os.path.join(directory, name))}


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_model_dir):
    """tiny_model_dir's model with other random weights (a second revision)."""
    from spin_jax.io import hf
    from spin_jax.io.load import load_tokenizer

    cfg, _ = hf.read_hf_dir(tiny_model_dir)
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(7)))
    out = str(tmp_path_factory.mktemp("second") / "model")
    hf.export_hf_dir(params, cfg, out, load_tokenizer(tiny_model_dir))
    return out


def logits(model):
    tokens = np.arange(1, 9)[None]
    return np.asarray(transformer.forward(model.params, model.cfg, tokens)[0])


def test_model_by_hub_id_fetches_only_what_it_reads_into_the_hf_cache(fake_hub, tiny_model_dir, second_model_dir,
                                                                      monkeypatch):
    files = files_of(tiny_model_dir)
    main = fake_hub.add_repo("org/tiny", {**files, "pytorch_model.bin": b"pickle", "onnx/model.safetensors": b"x",
                                          "original/consolidated.pth": b"pickle"})
    v2 = fake_hub.add_repo("org/tiny", files_of(second_model_dir), revision="v2")
    local, local2 = load_model(tiny_model_dir), load_model(second_model_dir)
    model = load_model("org/tiny")
    cache = os.path.join(os.environ["HF_HOME"], "hub", "models--org--tiny", "snapshots", main)
    assert model.source == cache
    assert sorted(os.listdir(cache)) == sorted(files)  # no pickle, nothing from sub-folders
    fetched = [path for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path]
    assert not any(p.endswith((".bin", ".pth")) or "/onnx/" in p for p in fetched)
    np.testing.assert_array_equal(logits(model), logits(local))
    # a revision: by branch (spec@rev or the revision argument, as model.revision passes it) and by sha
    for spec, revision in (("org/tiny@v2", None), ("org/tiny", "v2"), (f"org/tiny@{v2}", None)):
        np.testing.assert_array_equal(logits(load_model(spec, revision=revision)), logits(local2))
    with pytest.raises(SpinError, match="no revision 'v3'"):
        load_model("org/tiny", revision="v3")
    # cached: offline mode loads it without a request
    set_offline(monkeypatch)
    before = len(fake_hub.requests)
    np.testing.assert_array_equal(logits(load_model("org/tiny")), logits(local))
    assert len(fake_hub.requests) == before


def test_hub_errors_say_what_to_do(fake_hub, tiny_model_dir, monkeypatch):
    files = files_of(tiny_model_dir)
    fake_hub.add_repo("org/gated", files, gated=True, token="hf_secret")
    fake_hub.add_repo("org/pickled", {k: v for k, v in files.items() if not k.endswith(".safetensors")}
                      | {"pytorch_model.bin": b"pickle", "onnx/model.safetensors": b"not the model's weights"})
    with pytest.raises(SpinError, match=r"is gated .*accept its terms at http://127\.0\.0\.1:\d+/org/gated.*HF_TOKEN"):
        load_model("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(SpinError, match="has no access yet"):
        load_model("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    np.testing.assert_array_equal(logits(load_model("org/gated")), logits(load_model(tiny_model_dir)))
    with pytest.raises(SpinError, match="'org/missing' was not found on the Hub.*no local directory"):
        load_model("org/missing")
    with pytest.raises(SpinError, match=r"only pickle weights \(pytorch_model\.bin\).*refuses pickle"):
        load_model("org/pickled")
    assert not any(p.endswith(".bin") for _, p in fake_hub.requests)
    set_offline(monkeypatch)
    with pytest.raises(SpinError, match="not in the HF cache .*HF_HUB_OFFLINE is set"):
        load_model("org/elsewhere")


def test_plan_reads_a_hub_models_config_alone(fake_hub, tiny_model_dir):
    fake_hub.add_repo("org/tiny", files_of(tiny_model_dir))
    cfg = model_config_only("org/tiny")
    assert cfg.num_layers == 2 and cfg.hidden_size == 32
    fetched = {p.rsplit("/", 1)[-1] for method, p in fake_hub.requests if method == "GET" and "/resolve/" in p}
    assert fetched == {"config.json"}


def test_ultrachat_from_the_hub(fake_hub, tmp_path):
    from spin_jax.data import builders
    from tests.test_data import _ultrachat_dir

    local = _ultrachat_dir(tmp_path / "uc")
    parquet = {f"data/{name}": open(os.path.join(local, "data", name), "rb").read()
               for name in os.listdir(os.path.join(local, "data"))}
    fake_hub.add_repo("HuggingFaceH4/ultrachat_200k", {**parquet, "data/train_gen-00000-of-00001.parquet": b"x",
                                                       "README.md": b"card"}, repo_type="dataset")
    # unset manual_dir: the Hub's HuggingFaceH4/ultrachat_200k, only the SFT splits' parquet files
    train = builders.load_split("ultrachat_200k", str(tmp_path / "tfds"), "train_sft")
    assert len(train) == 12 and train[0]["prompt"].startswith("train_sft question")
    fetched = [p for method, p in fake_hub.requests if method == "GET" and "/resolve/" in p]
    assert fetched and all("_sft-" in p for p in fetched)
    fake_hub.add_repo("me/chats", parquet, repo_type="dataset")
    again = builders.load_split("ultrachat_200k", str(tmp_path / "tfds2"), "test_sft", manual_dir="me/chats")
    assert len(again) == 3
    with pytest.raises(SpinError, match="data set 'me/none' was not found on the Hub"):
        builders.load_split("ultrachat_200k", str(tmp_path / "tfds3"), "test_sft", manual_dir="me/none")


def test_export_push_to_hub_uploads_the_model_and_its_card(fake_hub, tiny_model_dir, tmp_path):
    from spin_jax import cli, rundir
    from spin_jax.config import load_config

    runs = tmp_path / "runs"
    sets = ["--set", f"runs_dir={runs}", "--set", "run_name=r", "--set", "model.name=org/base"]
    cfg = load_config("configs/tiny_test.yaml", [s for s in sets if s != "--set"])
    os.makedirs(cfg.iter_dir(0))
    rundir.write_json(os.path.join(cfg.iter_dir(0), rundir.CONFIG), dict(cfg.to_dict(), iteration=0,
                                                                           opponent="org/base"))
    import shutil

    shutil.copytree(tiny_model_dir, rundir.model_dir(cfg.run_dir, 0))
    out = str(tmp_path / "export")
    cli.main(["export", "--config", "configs/tiny_test.yaml", *sets, "--iter", "0", "--out", out,
              "--push-to-hub", "me/spin-tiny", "--private"])
    assert fake_hub.created["me/spin-tiny"].get("visibility") == "private" or \
        fake_hub.created["me/spin-tiny"].get("private") is True
    uploaded = fake_hub.uploads["me/spin-tiny"]
    assert set(uploaded) == set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(uploaded)
    assert uploaded["model.safetensors"] == open(os.path.join(out, "model.safetensors"), "rb").read()
    card = uploaded["README.md"].decode()
    assert card.startswith("---\nbase_model: org/base\n") and "- spin" in card
    json.loads(uploaded["config.json"])
    # the upload can be downloaded back as a model
    np.testing.assert_array_equal(logits(load_model("me/spin-tiny")), logits(load_model(out)))


def test_push_to_a_bad_repo_id_is_a_clear_error(fake_hub, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(SpinError, match="expected a Hub repo id"):
        hub.push_folder(str(tmp_path / "d"), "not a repo")
