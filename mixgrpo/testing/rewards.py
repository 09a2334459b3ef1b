"""``RewardContract``: the tests every ``Reward`` plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_reward``::

    class TestMyReward(RewardContract):
        def make_reward(self):
            return MyReward(path=TINY_MODEL)

Only properties that hold for any correct reward are checked:

- it is a ``Reward`` with a non-empty ``str`` name and a ``bool`` ``higher_is_better``;
- on valid input it returns ``[B]`` float32 scores, finite, on the images' device;
- it is deterministic (same input, same scores);
- batch-order equivariance: permuting the batch permutes the scores;
- batch-size independence: scoring images one by one gives the scores of scoring them together
  (so scores do not depend on how the trainer splits a batch into micro-batches);
- it leaves its inputs unchanged, and rejects a number of prompts that is not the batch size.

Override ``make_inputs`` to score other images or prompts (e.g. prompts of your reward's domain),
and ``atol`` / ``rtol`` where a model's batched kernels legitimately differ in the last bits.

A reward that declares ``uses_source_images = True`` (an editing reward) is called by every check
above with ``sources=`` as well (``make_sources``: the source images, permuted and split with the
rest), and must reject source images whose number is not the batch size; one that does not declare
it is called with images and prompts alone, exactly as the trainer calls it.
"""

from __future__ import annotations

import pytest
import torch

from mixgrpo.core.interfaces import Reward

#: prompts of the embedded shapes world; also plain English for text-image rewards
DEFAULT_PROMPTS = (
    "a red circle",
    "two blue squares",
    "a green triangle and a yellow square",
    "a white circle left of a red triangle",
)


class RewardContract:
    """Generic tests for a ``Reward``. Subclasses override ``make_reward``."""

    #: tolerances of the batch-size and batch-order comparisons
    atol: float = 1e-5
    rtol: float = 1e-5

    def make_reward(self) -> Reward:
        """Return the reward under test (override in the subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must override make_reward()")

    def make_inputs(self) -> tuple[torch.Tensor, list[str]]:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] and ``B`` prompts the reward accepts (B ≥ 3).

        The default: seeded random images 32×32 with ``DEFAULT_PROMPTS``.
        """
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(len(DEFAULT_PROMPTS), 3, 32, 32, generator=gen)
        return images, list(DEFAULT_PROMPTS)

    def make_sources(self, images: torch.Tensor) -> torch.Tensor:
        """Source images ``[B, 3, H, W]`` float32 in [0, 1] for a reward with ``uses_source_images``
        (one per image of ``make_inputs``). The default: seeded random images of the same shape."""
        return torch.rand(images.shape, generator=torch.Generator().manual_seed(2))

    # -- helpers -------------------------------------------------------------------------------
    def _call(self, reward: Reward, images: torch.Tensor, prompts: list[str],
              sources: torch.Tensor | None = None) -> torch.Tensor:
        """The reward called as the trainer calls it: with ``sources`` only when it asks for them."""
        if not reward.uses_source_images:
            return reward(images, prompts)
        return reward(images, prompts, sources=self.make_sources(images) if sources is None else sources)

    def _inputs(self) -> tuple[torch.Tensor, list[str]]:
        images, prompts = self.make_inputs()
        assert images.ndim == 4 and images.shape[1] == 3 and len(prompts) == images.shape[0] >= 3, (
            "make_inputs must return images [B, 3, H, W] and B ≥ 3 prompts")
        return images, list(prompts)

    def _assert_close(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual, expected, atol=self.atol, rtol=self.rtol, equal_nan=True)

    # -- the contract --------------------------------------------------------------------------
    def test_is_reward(self):
        reward = self.make_reward()
        assert isinstance(reward, Reward)
        assert isinstance(reward.name, str) and reward.name
        assert isinstance(reward.higher_is_better, bool)
        assert isinstance(reward.uses_source_images, bool)

    def test_scores_shape_dtype_device_finite(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        scores = self._call(reward, images, prompts)
        assert isinstance(scores, torch.Tensor)
        assert scores.shape == (images.shape[0],), f"expected [{images.shape[0]}], got {tuple(scores.shape)}"
        assert scores.dtype == torch.float32
        assert scores.device == images.device
        assert torch.isfinite(scores).all(), f"non-finite scores on valid input: {scores}"

    def test_deterministic(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        first = self._call(reward, images, prompts)
        assert torch.equal(first, self._call(reward, images.clone(), list(prompts)))

    def test_batch_order_equivariant(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        sources = self.make_sources(images)
        scores = self._call(reward, images, prompts, sources)
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))
        perm = perm.roll(1) if torch.equal(perm, torch.arange(len(perm))) else perm
        permuted = self._call(reward, images[perm], [prompts[i] for i in perm.tolist()], sources[perm])
        self._assert_close(permuted, scores[perm])

    def test_batch_size_independent(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        sources = self.make_sources(images)
        together = self._call(reward, images, prompts, sources)
        one_by_one = torch.cat([self._call(reward, images[i: i + 1], prompts[i: i + 1], sources[i: i + 1])
                                for i in range(images.shape[0])])
        self._assert_close(one_by_one, together)

    def test_leaves_inputs_unchanged(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        before, prompts_before = images.clone(), list(prompts)
        sources = self.make_sources(images)
        sources_before = sources.clone()
        self._call(reward, images, prompts, sources)
        assert torch.equal(images, before) and prompts == prompts_before
        assert torch.equal(sources, sources_before)

    def test_wrong_number_of_prompts_raises(self):
        reward, (images, prompts) = self.make_reward(), self._inputs()
        with pytest.raises(ValueError):
            self._call(reward, images, prompts[:-1])
        if reward.uses_source_images:  # and a number of source images that is not the batch size
            with pytest.raises(ValueError):
                reward(images, prompts, sources=self.make_sources(images)[:-1])
