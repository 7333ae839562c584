"""Every shipped config loads; overrides and errors name the key."""

import glob

import pytest

from spin_jax.config import load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert 0 < cfg.data.max_prompt_length < cfg.data.max_length
    assert cfg.train.global_batch_size % cfg.train.grad_accum == 0


def test_paper_config_learning_rates_per_iteration():
    cfg = load_config("configs/zephyr_ultrachat_tpu.yaml")
    assert [cfg.train.lr_for_iter(t) for t in range(5)] == [5e-7, 5e-7, 1e-7, 1e-7, 1e-7]
    assert (cfg.train.beta, cfg.train.optimizer, cfg.train.global_batch_size) == (0.1, "rmsprop", 64)


def test_overrides_and_errors(tmp_path):
    cfg = load_config("configs/cpu_default.yaml", ["train.learning_rate=2e-6", "mesh.data=8"])
    assert cfg.train.learning_rate == 2e-6 and cfg.mesh.data == 8
    with pytest.raises(ValueError, match="unknown key train.'lr'"):
        load_config("configs/cpu_default.yaml", ["train.lr=1"])
    with pytest.raises(ValueError, match="train.epochs must be int"):
        load_config(None, ["train.epochs=two"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  nme: sharegpt\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key data.'nme'"):
        load_config(str(bad))
