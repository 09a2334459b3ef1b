"""``BackboneContract``: the tests every ``Backbone`` plugin must pass.

Subclass it in a test module, name the subclass ``Test…`` and override ``make_backbone``::

    class TestMyBackbone(BackboneContract):
        prompts = ("a red circle", "two blue squares", "a green star")

        def make_backbone(self):
            return MyBackbone(path=TINY_MODEL_DIR)

``make_backbone`` must return a fresh backbone with the same (deterministic) weights on every
call, in fp32 on the CPU, small enough that a forward pass takes well under a second. Tests that do
not modify the backbone share one instance per subclass.

What is checked:

- ``encode`` returns a ``Conditioning`` with batch ``B`` (and ``select`` keeps it consistent);
- ``velocity`` returns ``[B, *latent_shape()]`` fp32, finite; deterministic in eval mode; it depends
  on the prompt and on σ; batch consistency: a batch's velocities equal the per-sample ones
  (``batch_atol``), so log-probs recomputed on other micro-batches agree;
- the gradient of ``velocity(...).sum()`` reaches every parameter of ``trainable_parameters()``
  (and is not zero everywhere);
- ``decode`` returns ``[B, 3, H, W]`` floats in [0, 1];
- ``reference()`` (for a ``TorchBackbone``): equal to the live model before training; after the
  trainable weights move, the live velocity changes and the reference's does not;
- the members the core reads: ``module`` is an ``nn.Module`` holding every trainable parameter,
  ``velocity`` runs whatever ``module`` is now (the trainer wraps or shards it in place),
  ``unwrapped()`` is a module with the same parameters, ``dtype`` is a floating dtype, ``lora_rank``
  an integer >= 0;
- publishing: ``model_facts()`` is a ``ModelFacts``; ``set_guidance`` changes the setting it names
  (or raises ``ValueError``); a backbone with a diffusers pipeline exports a non-empty folder and
  describes it (``kind``, ``pipeline``, ``load``) and has a load snippet, one without refuses to
  export and has none.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from torch import nn

from mixgrpo.core.interfaces import Backbone, ModelFacts, TorchBackbone
from mixgrpo.core.types import Conditioning


class BackboneContract:
    """Generic tests for a ``Backbone``. Subclasses override ``make_backbone``."""

    #: prompts of the test batch (distinct, and made of words the backbone's tokenizer knows)
    prompts: tuple[str, ...] = ("a red circle", "two blue squares", "a green triangle")
    #: noise levels of the test batch, one per prompt
    sigmas: tuple[float, ...] = (0.9, 0.5, 0.2)
    #: tolerance of the batch-consistency check (fp32)
    batch_atol: float = 1e-5

    _shared: ClassVar[dict[type, Backbone]] = {}

    def make_backbone(self) -> Backbone:
        """Return a fresh backbone under test (override in the subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must override make_backbone()")

    # -- helpers -------------------------------------------------------------------------------
    def backbone(self) -> Backbone:
        """The shared, unmodified backbone of this test class (built on first use)."""
        cls = type(self)
        if cls not in BackboneContract._shared:
            BackboneContract._shared[cls] = self.make_backbone()
        bb = BackboneContract._shared[cls]
        if isinstance(bb, TorchBackbone):
            bb.module.eval()
        return bb

    def latents(self, backbone: Backbone, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(len(self.prompts), *backbone.latent_shape(), generator=gen)
        return x.to(backbone.device)

    def sigma(self, backbone: Backbone) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float32, device=backbone.device)

    def _velocity(self, backbone: Backbone, grad: bool = False, **overrides) -> torch.Tensor:
        cond = overrides["cond"] if "cond" in overrides else backbone.encode(list(self.prompts))
        x = overrides.get("x", self.latents(backbone))
        sigma = overrides.get("sigma", self.sigma(backbone))
        with torch.set_grad_enabled(grad):
            return backbone.velocity(x, sigma, cond)

    # -- encode --------------------------------------------------------------------------------
    def test_encode_batch(self):
        bb = self.backbone()
        cond = bb.encode(list(self.prompts))
        assert isinstance(cond, Conditioning)
        assert len(cond) == len(self.prompts)
        for name in ("pooled", "mask"):
            value = getattr(cond, name)
            assert value is None or value.shape[0] == len(self.prompts), name
        one = cond.select([1])
        assert len(one) == 1
        torch.testing.assert_close(one.embeds, cond.embeds[1:2])

    # -- velocity ------------------------------------------------------------------------------
    def test_velocity_shape_dtype_finite(self):
        bb = self.backbone()
        v = self._velocity(bb)
        assert v.shape == (len(self.prompts), *bb.latent_shape())
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()

    def test_velocity_deterministic(self):
        bb = self.backbone()
        torch.testing.assert_close(self._velocity(bb), self._velocity(bb), atol=0, rtol=0)

    def test_velocity_depends_on_prompt(self):
        bb = self.backbone()
        x = self.latents(bb)[:1].repeat(2, *([1] * len(bb.latent_shape())))
        sigma = torch.full((2,), 0.5, device=bb.device)
        v = bb.velocity(x, sigma, bb.encode(list(self.prompts[:2])))
        assert not torch.allclose(v[0], v[1], atol=1e-6), "two different prompts gave the same velocity"

    def test_velocity_depends_on_sigma(self):
        bb = self.backbone()
        cond = bb.encode(list(self.prompts))
        v_a = self._velocity(bb, cond=cond, sigma=torch.full((len(self.prompts),), 0.8, device=bb.device))
        v_b = self._velocity(bb, cond=cond, sigma=torch.full((len(self.prompts),), 0.3, device=bb.device))
        assert not torch.allclose(v_a, v_b, atol=1e-6), "velocity does not depend on sigma"

    def test_batch_consistency(self):
        bb = self.backbone()
        cond = bb.encode(list(self.prompts))
        x, sigma = self.latents(bb), self.sigma(bb)
        with torch.no_grad():
            batched = bb.velocity(x, sigma, cond)
            for n in range(len(self.prompts)):
                single = bb.velocity(x[n : n + 1], sigma[n : n + 1], cond.select([n]))
                torch.testing.assert_close(single[0], batched[n], atol=self.batch_atol, rtol=0)
        # encoding a prompt alone gives the same conditioning as encoding it within a batch
        alone = bb.encode([self.prompts[1]])
        torch.testing.assert_close(alone.embeds[0], cond.embeds[1], atol=self.batch_atol, rtol=0)

    def test_gradient_reaches_trainable_parameters(self):
        bb = self.make_backbone()
        params = bb.trainable_parameters()
        assert params, "no trainable parameters"
        for p in params:
            p.grad = None
        self._velocity(bb, grad=True).sum().backward()
        missing = [i for i, p in enumerate(params) if p.grad is None]
        assert not missing, f"{len(missing)} of {len(params)} trainable parameters got no gradient"
        assert any(p.grad.abs().sum() > 0 for p in params), "all gradients are zero"
        assert all(torch.isfinite(p.grad).all() for p in params)

    # -- decode --------------------------------------------------------------------------------
    def test_decode_range(self):
        bb = self.backbone()
        images = bb.decode(self.latents(bb) * 2)  # beyond the data range: decode must still clamp
        assert images.ndim == 4 and images.shape[:2] == (len(self.prompts), 3)
        assert images.is_floating_point() and torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1

    # -- reference -----------------------------------------------------------------------------
    def test_reference_frozen(self):
        bb = self.make_backbone()
        if not isinstance(bb, TorchBackbone):
            pytest.skip("reference() is checked for TorchBackbone subclasses")
        bb.module.eval()
        cond = bb.encode(list(self.prompts))
        live = self._velocity(bb, cond=cond)
        with bb.reference():
            ref = self._velocity(bb, cond=cond)
        torch.testing.assert_close(ref, live, atol=1e-6, rtol=0)
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in bb.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p))
        moved = self._velocity(bb, cond=cond)
        assert not torch.allclose(moved, live, atol=1e-5), "perturbing the trainable weights changed nothing"
        with bb.reference():
            ref_after = self._velocity(bb, cond=cond)
        torch.testing.assert_close(ref_after, ref, atol=1e-6, rtol=0)
        after = self._velocity(bb, cond=cond)  # leaving the context restores the live model
        torch.testing.assert_close(after, moved, atol=0, rtol=0)

    # -- the members the core reads ------------------------------------------------------------
    def test_module_holds_the_trainable_parameters(self):
        bb = self.backbone()
        assert isinstance(bb.module, nn.Module), "a Backbone sets self.module to its trainable network"
        assert isinstance(bb.unwrapped(), nn.Module)
        in_module = {id(p) for p in bb.module.parameters()}
        assert {id(p) for p in bb.unwrapped().parameters()} == in_module
        assert all(id(p) in in_module for p in bb.trainable_parameters()), (
            "trainable_parameters() must be parameters of module (the trainer wraps and shards module)")
        assert isinstance(bb.dtype, torch.dtype) and bb.dtype.is_floating_point
        assert isinstance(bb.lora_rank, int) and bb.lora_rank >= 0
        assert isinstance(bb.calls_per_velocity, int) and bb.calls_per_velocity >= 1

    def test_velocity_runs_the_current_module(self):
        """The trainer replaces ``module`` (DDP, FSDP, the frozen reference): ``velocity`` must call
        whatever ``self.module`` is at the time, never a reference kept from before."""
        bb = self.make_backbone()
        bb.module.eval()
        cond = bb.encode(list(self.prompts))
        live = self._velocity(bb, cond=cond)
        other = copy.deepcopy(bb.module)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in other.parameters():
                if p.is_floating_point():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p))
        original, bb.module = bb.module, other
        try:
            swapped = self._velocity(bb, cond=cond)
        finally:
            bb.module = original
        assert not torch.allclose(swapped, live, atol=1e-5), "velocity ignored a replaced self.module"
        torch.testing.assert_close(self._velocity(bb, cond=cond), live, atol=0, rtol=0)

    # -- publishing ----------------------------------------------------------------------------
    def test_model_facts(self):
        facts = self.backbone().model_facts()
        assert isinstance(facts, ModelFacts)
        assert all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in facts.guidance_settings.items())
        assert (facts.lora_alpha is None) or self.backbone().lora_rank > 0

    def test_set_guidance_changes_the_setting_it_names(self):
        bb = self.make_backbone()
        try:
            name = bb.set_guidance(2.5)
        except ValueError:
            return  # a backbone without guidance says so
        assert bb.model_facts().guidance_settings[name] == 2.5

    def test_export_or_refuse(self, tmp_path):
        bb = self.backbone()
        facts = bb.model_facts()
        out = tmp_path / "export"
        out.mkdir()
        if not facts.pipeline:
            with pytest.raises(ValueError):
                bb.export(out)
            assert bb.load_snippet("exported", self.prompts[0], 4) == []
            return
        info = bb.export(out, load_path="published")
        assert info["kind"] in ("lora", "full") and (info["kind"] == "lora") == (bb.lora_rank > 0)
        assert info["pipeline"] == facts.pipeline and "published" in info["load"]
        assert any(out.iterdir()), "export wrote nothing"
        snippet = bb.load_snippet("exported/run", self.prompts[0], 4)
        assert snippet and all(isinstance(line, str) for line in snippet) and "exported/run" in "\n".join(snippet)
