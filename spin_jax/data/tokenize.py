"""SPIN tokenization: the chat template, the reference's truncation rule, padded batches.

A prompt is one user turn through the tokenizer's own chat template with the generation prompt;
a response is its tokens followed by the end-of-turn token (the tokenizer's EOS, e.g. <|im_end|>
for ChatML). Prompt and response are tokenized separately and concatenated, as the reference does.

Two batch layouts. `pack_grouped` -> `SpinBatch` (training and scoring): each prompt once, its g
responses apart, so a forward computes a prompt once for all its responses
(`transformer.forward_shared_prefix`):
    prompt_tokens, prompt_valid, prompt_positions  [N, P]   prompts left-padded
    tokens, valid, positions                       [gN, R]  responses right-padded; row j continues
                                                            prompt j // g; positions continue the prompt's
    opponent_logps                                 [gN]     the opponent's summed log-probs, or None
Each response token is scored (label = token, mask = valid): the prompt's last position predicts
response token 0, response position t predicts token t + 1.

`pack` (the sampler's prompts; whole-row reference scoring in tests), for N sequences (prompt
bucket P, response bucket R):
    tokens    [N, P + R]   prompt left-padded into [0, P), response right-padded into [P, P + R)
    valid     [N, P + R]   True on real tokens
    positions [N, P + R]   0, 1, ... over the real tokens (RoPE positions; padding repeats)
    labels    [N, P + R]   labels[t] = tokens[t + 1] (0 at the end)
    loss_mask [N, P + R]   True where labels[t] is a real response token
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import struct


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    return list(out)


def response_ids(tokenizer, response: str) -> list[int]:
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [end_of_turn_id(tokenizer)]


def end_of_turn_id(tokenizer) -> int:
    return int(tokenizer.eos_token_id)


def truncate(prompt: list[int], responses: Sequence[list[int]], max_length: int,
             max_prompt_length: int):
    """The reference's rule: if prompt + the longest response exceeds max_length, keep the LAST
    max_prompt_length prompt tokens; if still too long, cut every response to
    max_length - max_prompt_length tokens."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return prompt, list(responses)


def bucket(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """The smallest power of two >= n (at least `minimum`, at most `maximum`)."""
    b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return min(b, maximum) if maximum else b


def pack(prompts: Sequence[list[int]], responses: Sequence[list[int]], prompt_len: int,
         response_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pad prompt/response pairs into the batch layout described in the module docstring."""
    n, width = len(prompts), prompt_len + response_len
    tokens = np.full((n, width), pad_id, np.int32)
    valid = np.zeros((n, width), bool)
    is_response = np.zeros((n, width), bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) > prompt_len or len(r) > response_len:
            raise ValueError(f"row {i}: prompt {len(p)} / response {len(r)} tokens exceed the "
                             f"buckets {prompt_len} / {response_len}")
        tokens[i, prompt_len - len(p):prompt_len] = p
        valid[i, prompt_len - len(p):prompt_len] = True
        tokens[i, prompt_len:prompt_len + len(r)] = r
        valid[i, prompt_len:prompt_len + len(r)] = True
        is_response[i, prompt_len:prompt_len + len(r)] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros_like(valid)
    loss_mask[:, :-1] = is_response[:, 1:]
    return dict(tokens=tokens, valid=valid, positions=positions, labels=labels, loss_mask=loss_mask)


@struct.dataclass
class SpinBatch:
    """A grouped batch (module docstring). Training adds a leading micro-batch axis to every field
    (`microbatches`). Arrays are numpy on the host and jax arrays once placed on a mesh."""
    prompt_tokens: Any  # [N, P] int32
    prompt_valid: Any  # [N, P] bool
    prompt_positions: Any  # [N, P] int32
    tokens: Any  # [gN, R] int32
    valid: Any  # [gN, R] bool
    positions: Any  # [gN, R] int32
    opponent_logps: Optional[Any] = None  # [gN] float32: (real, generated) of each pair, or None

    @property
    def group(self) -> int:
        """Responses per prompt."""
        return self.tokens.shape[-2] // self.prompt_tokens.shape[-2]

    def with_opponent_logps(self, logps) -> "SpinBatch":
        return self.replace(opponent_logps=logps)

    def microbatches(self, n: int) -> "SpinBatch":
        """[N, ...] / [gN, ...] fields -> [n, N/n, ...] / [n, gN/n, ...], each micro-batch holding
        whole groups."""
        prompts = self.prompt_tokens.shape[0]
        if n <= 0 or prompts % n:
            raise ValueError(f"a batch of {prompts} prompts does not split into {n} micro-batches "
                             "of whole pairs (train.grad_accum must divide the pairs per host)")
        return jax.tree.map(lambda v: np.asarray(v).reshape(n, v.shape[0] // n, *v.shape[1:]), self)


def pack_grouped(prompts: Sequence[list[int]], responses: Sequence[list[int]], prompt_len: int,
                 response_len: int, pad_id: int = 0, opponent_logps=None) -> SpinBatch:
    """The grouped layout of the module docstring: len(responses) = g * len(prompts), response j
    continuing prompt j // g (SPIN: g = 2, real and generated interleaved)."""
    n, g = len(prompts), len(responses) // max(len(prompts), 1)
    if n == 0 or g * n != len(responses):
        raise ValueError(f"{len(responses)} responses is not a whole number of groups of {n} prompts")
    p = pack(prompts, [[] for _ in prompts], prompt_len, 0, pad_id)
    tokens = np.full((g * n, response_len), pad_id, np.int32)
    valid = np.zeros((g * n, response_len), bool)
    for j, r in enumerate(responses):
        if len(r) > response_len:
            raise ValueError(f"row {j}: response {len(r)} tokens exceeds the bucket {response_len}")
        tokens[j, :len(r)] = r
        valid[j, :len(r)] = True
    start = np.repeat([len(x) for x in prompts], g)[:, None]
    positions = (start + np.maximum(np.cumsum(valid, axis=1) - 1, 0)).astype(np.int32)
    if opponent_logps is not None:
        opponent_logps = np.asarray(opponent_logps, np.float32).reshape(g * n)
    return SpinBatch(prompt_tokens=p["tokens"], prompt_valid=p["valid"], prompt_positions=p["positions"],
                     tokens=tokens, valid=valid, positions=positions, opponent_logps=opponent_logps)
