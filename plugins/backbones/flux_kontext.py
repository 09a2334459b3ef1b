"""FLUX.1-Kontext (image editing) as a mixgrpo backbone: FLUX conditioned on a source image.

The snapshot is a FLUX.1 snapshot (``FluxKontextPipeline``'s: the same transformer class, CLIP, T5
and VAE), loaded as ``flux.py`` loads one. What Kontext adds, done here as the pipeline does it:

* each prompt is an ``EditPrompt`` (an instruction with the path of its source image); ``encode``
  reads the source, resizes it to ``source_height × source_width`` (PIL Lanczos, as the pipeline's
  ``VaeImageProcessor``), VAE-encodes it (the posterior's mode, shifted and scaled) and keeps its
  latents ``[B, C, hs, ws]`` in ``Conditioning.extra["source_latents"]``, batched with the text;
* every transformer call packs the source latents into 2×2 patches, appends their tokens after the
  tokens of the image being generated, with their own position ids ``(1, row, col)`` (the generated
  image's are ``(0, row, col)``), and keeps only the output tokens of the generated image;
* under classifier-free guidance (the pipeline's ``true_cfg_scale``) both branches see the source.

The σ grid of ``FluxKontextPipeline`` is FLUX's dynamic one: ``grid = 'dynamic'`` with
``mu = pipeline_mu()`` (``FluxBackbone``'s: ``flux_mu`` of the generated image's token count; the
source's tokens do not count). Unlike the pipeline, which resizes each source to the preferred Kontext
resolution nearest its aspect ratio, every source here is resized to one size (so that a batch holds
one tensor), as Flow-Factory's ``condition_image_size`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.types import Conditioning, EditPrompt
from mixgrpo.plugins.backbones.flux import FluxBackbone, image_ids, pack

#: the key of the source latents in ``Conditioning.extra``
SOURCE_LATENTS = "source_latents"


def source_ids(rows: int, cols: int) -> torch.Tensor:
    """Position ids ``[rows·cols, 3]`` of the source image's tokens: ``(1, row, col)``, row-major."""
    ids = image_ids(rows, cols)
    ids[:, 0] = 1.0  # the pipeline tells the source apart from the generated image by the first axis
    return ids


class FluxKontextBackbone(FluxBackbone):
    """FLUX.1-Kontext from a local diffusers snapshot; prompts are ``EditPrompt`` items.

    Args: those of ``FluxBackbone``, and
        source_height, source_width: the size in pixels every source image is resized to before it is
            VAE-encoded; default the generated image's (``height``, ``width``). Multiples of 2× the VAE's
            downsampling factor.
        guidance: the embedded guidance (FLUX.1-Kontext-dev is guidance-distilled); default 2.5, the
            model card's and ``FluxKontextPipeline``'s documented example value.
    """

    family, model_name = "flux_kontext", "FLUX.1-Kontext"
    uses_source_images = True  # every prompt is an EditPrompt (``mixgrpo sample`` takes edits)
    transformer_class, diffusers_pipeline = "FluxTransformer2DModel", "FluxKontextPipeline"

    def __init__(self, path: str, height: int | None = None, width: int | None = None,
                 source_height: int | None = None, source_width: int | None = None,
                 dtype: str = "float32", guidance: float = 2.5, cfg_scale: float = 1.0,
                 cfg_gradient: str = "conditional", timestep_quantization: int | None = None,
                 max_sequence_length: int = 512,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                 attention_backend: str | None = None, compile: str = "none",  # noqa: A002 (gin name)
                 device: str | None = None) -> None:
        self._source_size = (source_height, source_width)
        self._source: torch.Tensor | None = None  # the source latents of the velocity call under way
        super().__init__(path, height, width, dtype=dtype, guidance=guidance, cfg_scale=cfg_scale,
                         cfg_gradient=cfg_gradient, timestep_quantization=timestep_quantization,
                         max_sequence_length=max_sequence_length, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                         attention_backend=attention_backend, compile=compile, device=device)

    def _set_latent_layout(self, root: Path, height: int | None, width: int | None) -> None:
        super()._set_latent_layout(root, height, width)
        self.source_height = int(self._source_size[0] or self.height)
        self.source_width = int(self._source_size[1] or self.width)
        step = self.vae_scale_factor * self.patch
        if self.source_height % step or self.source_width % step:
            raise ValueError(f"source_height and source_width must be multiples of {step}, got "
                             f"{self.source_height}×{self.source_width}")

    # -- conditioning ---------------------------------------------------------------------------
    def _edits(self, prompts: list[str]) -> list[EditPrompt]:
        plain = [p for p in prompts if not isinstance(p, EditPrompt)]
        if plain:
            raise ValueError(f"{self.model_name} edits a source image, but prompt {str(plain[0])!r} carries none: use "
                             f"an editing prompt set (TrainConfig.prompt_set = 'edit'), whose items are EditPrompt")
        return prompts  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """``EditPrompt`` items → ``FluxBackbone``'s text conditioning, with the source latents
        ``extra["source_latents"]`` ``[B, C, source_height / f, source_width / f]`` fp32 (f the VAE's
        downsampling factor)."""
        edits = self._edits(list(prompts))
        cond = super().encode(edits)
        pixels = torch.stack([p.pixels(self.source_height, self.source_width) for p in edits])
        cond.extra[SOURCE_LATENTS] = self.encode_images(pixels).to(cond.embeds.device)
        return cond

    def negative(self) -> Conditioning:
        """The empty prompt's text conditioning (guidance's other branch; it sees the same source)."""
        if self._negative is None or self._negative.embeds.device != self.device:
            self._negative = super().encode([""])
        return self._negative

    # -- the transformer call ------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``FluxBackbone.velocity`` with the source image's tokens in every transformer call."""
        source = cond.extra.get(SOURCE_LATENTS)
        if source is None or source.shape[0] != x.shape[0]:
            found = "none" if source is None else f"{source.shape[0]} rows"
            raise ValueError(f"{self.model_name} needs the source latents of each of the {x.shape[0]} samples in "
                             f"cond.extra[{SOURCE_LATENTS!r}] (FluxKontextBackbone.encode puts them there), "
                             f"got {found}")
        # the shared velocity (guidance, autocast, timesteps) calls _forward, which reads the source here
        self._source = source.to(self.device, self.dtype)
        try:
            return super().velocity(x, sigma, cond)
        finally:
            self._source = None

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """One transformer call on the generated image's tokens followed by the source's; returns the
        generated image's part, unpacked ``[B, C, h, w]``."""
        device, batch = x.device, x.shape[0]
        source = self._source
        if source is None:
            raise RuntimeError("FluxKontextBackbone._forward runs inside velocity(), which sets the source")
        if source.shape[0] != batch:  # guidance's doubled batch: both branches edit the same source
            source = source.repeat(batch // source.shape[0], 1, 1, 1)
        tokens = self.pack(x)
        rows, cols = self.latent_height // self.patch, self.latent_width // self.patch
        ids = torch.cat([image_ids(rows, cols),
                         source_ids(source.shape[2] // self.patch, source.shape[3] // self.patch)]).to(device)
        guidance = None
        if self.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        out = self._network()(
            hidden_states=torch.cat([tokens, pack(source, self.patch)], dim=1),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t.to(self.dtype),
            img_ids=ids,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return self.unpack(out[:, : tokens.shape[1]])

    # -- publishing ----------------------------------------------------------------------------
    def load_snippet(self, export_dir: str, prompt: str, num_steps: int) -> list[str]:
        """``FluxBackbone``'s snippet with the source image passed to the pipeline (the prompt's own when
        it is an ``EditPrompt``), and ``max_area`` set so that the pipeline keeps the trained size."""
        lines = super().load_snippet(export_dir, prompt, num_steps)
        source = prompt.image if isinstance(prompt, EditPrompt) else "source.png"
        for k, line in enumerate(lines):
            if line.startswith("image = pipe("):
                line = line.replace("pipe(", f"pipe(image=load_image({source!r}), prompt=", 1)
                lines[k] = line.replace(").images[0]", f", max_area={self.height * self.width}).images[0]")
        return [lines[0], "from diffusers.utils import load_image", *lines[1:]]


@hookimpl
def register_backbones(register):
    register("flux_kontext", FluxKontextBackbone)
