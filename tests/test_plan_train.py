"""The paper config's and the LoRA config's train steps compiled by XLA:TPU: they fit, move no whole
batch and gather no weight in a loop (tests/test_plan.py's check; its own file, so that the
suite's two workers share these compiles with the score and sample programs')."""

from tests.test_plan import check_tpu_layouts


def test_paper_and_lora_train_steps_on_tpu_fit_and_move_no_whole_batch():
    out = check_tpu_layouts(["paper:train", "lora:train"], 2)
    assert out["v5p-32 train"]["mesh"]["fsdp"] == 16 and set(out) == {"v5p-32 train", "v5e-8 train"}, out
