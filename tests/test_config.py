"""Every shipped config loads; overrides and errors name the key."""

import glob

import pytest

from spin_jax.config import ConfigError, load_config


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
    with pytest.raises(ValueError, match="bad.yaml:2: unknown key data.'nme'"):
        load_config(str(bad))


# ----------------------------------------------------------------------------------------------
# validation: every bad value fails at load time, before any model is loaded, naming its key


BAD_VALUES = [
    ("train.global_batch_size=-8", "train.global_batch_size=-8: >= 1"),
    ("train.grad_accum=3", "train.grad_accum=3: a divisor of train.global_batch_size (8)"),
    ("train.learning_rate=-1", "train.learning_rate=-1.0: > 0"),
    ("train.learning_rates=[5.0e-7, -1]", "train.learning_rates=[5e-07, -1]: a list of numbers > 0"),
    ("train.beta=0", "train.beta=0.0: > 0"),
    ("train.loss_type=dpo", "train.loss_type='dpo': one of sigmoid, hinge, ipo"),
    ("train.optimizer=sgd", "train.optimizer='sgd': rmsprop or adamw"),
    ("train.opponent_logps=maybe", "train.opponent_logps='maybe': precomputed or in_step"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: >= 1"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5: in [0, 1]"),
    ("sampling.temperature=0", "sampling.temperature=0.0: > 0 (for deterministic sampling set sampling.greedy=true"),
    ("sampling.top_p=0", "sampling.top_p=0.0: in (0, 1]"),
    ("sampling.batch_size=-1", "sampling.batch_size=-1: >= 1"),
    ("sampling.chunk_size=0", "sampling.chunk_size=0: >= 1"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens=0: >= 1"),
    ("data.max_prompt_length=500", "data.max_prompt_length=500: >= 1 and < data.max_length (192)"),
    ("model.remat=some", "model.remat='some': one of none, full, dots"),
    ("mesh.data=0", "mesh.data=0: >= 1, or -1"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_refused_with_key_value_source_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/cpu_default.yaml", [override])
    assert f"--set {override}: {message}" in str(e.value)


def test_all_errors_at_once_with_yaml_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: 0\n  epochs: 2\n  checkpoint_every: 0\nsampling:\n  temperature: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert len(e.value.problems) == 3
    text = str(e.value)
    assert f"{bad}:2: train.beta=0.0" in text and f"{bad}:4: train.checkpoint_every=0" in text
    assert f"{bad}:6: sampling.temperature=0.0" in text
    assert load_config(str(bad), ["train.beta=0.1", "train.checkpoint_every=5", "sampling.greedy=true"])


def test_malformed_inputs_are_one_clear_error(tmp_path):
    bad = tmp_path / "syntax.yaml"
    bad.write_text("train:\n  beta: [0.1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="a directory; expected a YAML file"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--set train.beta.x=1: train.beta is a value, not a section"):
        load_config("configs/cpu_default.yaml", ["train.beta.x=1"])
    with pytest.raises(ConfigError, match=r"--set train.epochs=two: train.epochs must be int"):
        load_config("configs/cpu_default.yaml", ["train.epochs=two"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("configs/cpu_default.yaml", ["train.beta"])


@pytest.mark.parametrize("argv,message", [
    (["sample", "--prompt", "hi", "--temperature", "0"],
     "--temperature 0.0: must be > 0; for deterministic sampling use --greedy"),
    (["sample", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["sample", "--prompt", "hi", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["sample", "--prompt", "hi", "--max-new-tokens", "100000000"],
     "--max-new-tokens 100000000: the model's context is 8192 tokens, and the prompt needs some of them; use at "
     "most 8191"),
    (["sample", "--prompt", "hi", "--chat-template", "no/such.jinja"],
     "--chat-template no/such.jinja: neither a known template (gemma, chatml, llama3) nor an existing Jinja file"),
    (["sample", "--input", "no/such.jsonl", "--output", "y.jsonl"], "--input no/such.jsonl: no such file"),
    (["score", "--input", "no/such.jsonl", "--output", "y.jsonl"], "--input no/such.jsonl: no such file"),
    (["score", "--input", "x.jsonl", "--output", "y.jsonl", "--chat-template", "no/such.jinja"],
     "--chat-template no/such.jinja: neither a known template"),
    (["benchmark", "--model", "m", "--output", "o.json", "--tasks", "spin_local", "--chat-template", "no/such.jinja"],
     "--chat-template no/such.jinja: neither a known template"),
    (["score", "--input", "x.jsonl", "--output", "y.jsonl", "--batch-size", "-1"], "--batch-size -1: must be >= 1"),
    (["train", "--iter", "0", "--set", "train.global_batch_size=-8"], "train.global_batch_size=-8: >= 1"),
])
def test_cli_usage_errors_exit_2_before_any_model_load(argv, message, capsys, monkeypatch):
    from spin_jax import cli
    from spin_jax.io import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
