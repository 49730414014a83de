"""Generation step-through for the Explorer: generate once (greedy, or sampled with a seed, the patch set
installed as in `Lens.generate`), then step k is the prompt plus the first k generated tokens with the
token chosen at step k as the target. A step's trace is computed when the step is shown.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..errors import LensvizError

MAX_GENERATE = 512   # tokens the Explorer generates at most (a step scrubber, not a text generator)


def check_generate(n, lens=None, prompt_len: int | None = None) -> int:
    """`generate=` / the Generate button's count: an int in 1..MAX_GENERATE (and within the model's limit)."""
    n = check_int(n, "generate", 1)
    if n > MAX_GENERATE:
        raise LensvizError(f"generate must be at most {MAX_GENERATE} tokens, got {n}")
    if lens is not None and prompt_len is not None and prompt_len + n > lens.max_tokens:
        raise LensvizError(f"the prompt is {prompt_len} tokens and generate={n}: together more than the "
                           f"{lens.max_tokens} tokens this model accepts")
    return n


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    return check_int(seed, "seed", 0)


@dataclass(frozen=True)
class Stepping:
    """One generation the Explorer steps through. prompt: as given (str or list of str segments);
    ids: the generated token ids; tokens: each decoded; sample / seed: how they were chosen."""

    prompt: object
    ids: tuple
    tokens: tuple
    sample: bool
    seed: int | None

    def __len__(self) -> int:
        return len(self.ids)

    def check_step(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise LensvizError(f"step must be an int, got {k!r}")
        if not 0 <= k < len(self.ids):
            raise LensvizError(f"step must be in 0..{len(self.ids) - 1} (one per generated token), got {k}")
        return k

    def prefix(self, k: int) -> list:
        """The prompt of step k as segments: the prompt's own segments, then each of the first k generated
        tokens as a segment of its own (token ids, not re-tokenised). With a segment mask this is what
        `Lens.generate` did: the prompt prefilled segment by segment, new tokens decoded causally."""
        parts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return parts + [[int(i)] for i in self.ids[:k]]

    def target(self, k: int) -> int:
        return int(self.ids[k])


def generate(lens, prompt, n: int, patches=(), *, sample: bool = False, seed: int | None = None) -> Stepping:
    """Generate `n` tokens with `patches` installed (those `Lens.generate` accepts). sample=True draws from
    the model's distribution with torch's generator seeded by `seed` (the global RNG state is restored)."""
    if not isinstance(sample, bool):
        raise LensvizError(f"sample must be True or False, got {sample!r}")
    seed = check_seed(seed)
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if sample else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        if sample:
            torch.manual_seed(0 if seed is None else seed)
        gen = lens.generate(prompt, n, patches=tuple(patches), **kwargs)
    if not len(gen):
        raise LensvizError("the model generated no token (it ended the text at once)")
    return Stepping(prompt=prompt, ids=tuple(gen.ids.tolist()), tokens=tuple(gen.tokens), sample=sample, seed=seed)
