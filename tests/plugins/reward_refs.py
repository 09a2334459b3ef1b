"""Test-only access to the reference scorers (hpsv2, image-reward, open_clip) and tiny random models.

Nothing here is product code. The reference packages need torchvision at import. PyPI's torchvision
wheel for torch 2.13 links CUDA libraries that the CPU build of torch lacks, so its compiled ops
never load; its Python code (the transforms the scorers use) works once the two operator schemas
that ``torchvision/_meta_registrations.py`` registers fake kernels for at import (``nms``, ``qnms``)
exist. ``make venv`` installs that wheel into ``.venv/torchvision-cpu`` (outside site-packages, so no
product import ever sees it) and ``load_torchvision`` puts it on ``sys.path`` for these tests. Where a
working torchvision is installed (a GPU machine), it is used as it is.

Two more gaps of the reference packages are bridged here, each for an import that scoring never uses:
hpsv2's ``img_score`` imports ``clint`` (a progress bar for downloads; clint is kept out of the
environment), and ImageReward's BERT imports three helpers from ``transformers.modeling_utils`` that
transformers 5 moved to ``transformers.pytorch_utils`` or dropped (used only to prune heads).
ImageReward's package ``__init__`` imports its ReFL trainer and the OpenAI ``clip`` package for other
scores; the scorer module ``ImageReward.ImageReward`` is loaded without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

_TORCHVISION_LIB = None


def load_torchvision():
    global _TORCHVISION_LIB
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        folder = Path(sys.prefix) / "torchvision-cpu"
        if not (folder / "torchvision").is_dir():
            raise RuntimeError(f"torchvision is not installed and {folder} is missing: run `make venv` "
                               f"(it installs the reference scorers the reward tests compare with)")
        sys.path.insert(0, str(folder))
    if not hasattr(torch.ops.torchvision, "nms") and _TORCHVISION_LIB is None:
        try:
            import torchvision  # noqa: F401  (a working install needs nothing more)
            return sys.modules["torchvision"]
        except RuntimeError:
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB = lib  # the definitions live as long as this object
    import torchvision

    return torchvision


def load_hpsv2_scorer():
    """``hpsv2.img_score`` (its ``score`` function and ``model_dict``)."""
    load_torchvision()
    if "clint.textui" not in sys.modules and importlib.util.find_spec("clint") is None:
        clint, textui = types.ModuleType("clint"), types.ModuleType("clint.textui")
        textui.progress = None
        clint.textui = textui
        sys.modules["clint"], sys.modules["clint.textui"] = clint, textui
    import hpsv2.img_score

    return hpsv2.img_score


def load_imagereward_scorer():
    """The module ``ImageReward.ImageReward`` (the ``ImageReward`` class and its ``score``)."""
    load_torchvision()
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    def _unused(*args, **kwargs):
        raise NotImplementedError("head pruning is not used by ImageReward's scorer")

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, _unused))
    if "ImageReward.ImageReward" not in sys.modules:
        spec = importlib.util.find_spec("ImageReward")
        if spec is None:
            raise RuntimeError("image-reward is not installed: run `make venv`")
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__path__ = [str(path)]
                sys.modules[name] = module
    import ImageReward.ImageReward as scorer

    return scorer


# -- tiny models and images -------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "red", "blue", "green", "cat", "dog", "car", "tree", "on", "the", "left", "right",
         "big", "small", "two", "three", "house", "sky"]
PROMPTS = ["a photo of a red cat", "two blue cars on the left", "a big green tree", "the sky on the right",
           "three small dogs", "a house"]


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Add noise to every weight so that scores differ clearly between images and prompts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def textured_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Deterministic ``H×W×3`` uint8 images with gradients, stripes, sharp edges and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.zeros((h, w, 3))
        for c in range(3):
            fx, fy, phase = rng.uniform(0.01, 0.3, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 0.5 + 0.3 * np.sin(fx * x + fy * y + phase)
            img[..., c] += 0.2 * ((x // rng.integers(7, 40) + y // rng.integers(7, 40)) % 2)
        img += rng.normal(0, 0.08, img.shape)
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return out


def as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """Same-size uint8 images → float ``[B, 3, H, W]`` in [0, 1] (what a sampler hands a reward)."""
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255.0


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over the printable ASCII characters, without merges: tiny and real."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(folder)


def make_tiny_clip(folder: Path, seed: int, logit_scale: float = 3.0) -> Path:
    """A random transformers ``CLIPModel`` (224-pixel input, 32-pixel patches) with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    write_clip_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=190, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=188, eos_token_id=189,
                         pad_token_id=189),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16, logit_scale_init_value=logit_scale)
    model = CLIPModel(config)
    perturb(model, seed)
    model.save_pretrained(folder)
    return folder


#: an open_clip model config: ViT-H-14's structure (GELU, CLIP tokenizer and context), tiny widths
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_tiny_hps(folder: Path, seed: int) -> tuple[Path, Path]:
    """A random open_clip CLIP built by hpsv2's own ``create_model_and_transforms`` (as its scorer
    builds ViT-H-14), saved as the HPS checkpoints are (``{"state_dict": ...}``). Returns the
    checkpoint and the model-config JSON."""
    scorer = load_hpsv2_scorer()
    from hpsv2.src.open_clip import factory

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "HPSTiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    factory.add_model_config(config)
    torch.manual_seed(seed)
    model, _, _ = factory.create_model_and_transforms("HPSTiny", None, precision="amp", device="cpu", jit=False,
                                                      output_dict=True)
    perturb(model, seed)
    ckpt = folder / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    assert scorer is not None
    return ckpt, config


def hpsv2_reference(ckpt: Path, config: Path, images: list[np.ndarray], prompts: list[str]) -> list[float]:
    """hpsv2's ``img_score.score`` for each (image, prompt), with its model built from ``config``
    (``score`` builds ViT-H-14 from the hub on first use; here its ``model_dict`` is filled first, with
    the arguments its ``initialize_model`` passes)."""
    from PIL import Image

    scorer = load_hpsv2_scorer()
    from hpsv2.src.open_clip import factory

    factory.add_model_config(config)
    model, _, preprocess_val = factory.create_model_and_transforms(
        config.stem, None, precision="amp", device=scorer.device, jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    saved = dict(scorer.model_dict)
    scorer.model_dict.clear()
    scorer.model_dict.update(model=model, preprocess_val=preprocess_val)
    try:
        return [float(scorer.score([Image.fromarray(a)], p, cp=str(ckpt), hps_version="v2.1")[0])
                for a, p in zip(images, prompts)]
    finally:
        scorer.model_dict.clear()
        scorer.model_dict.update(saved)


def write_bert_tokenizer(folder: Path) -> Path:
    """A bert-base-uncased-style WordPiece tokenizer over ``WORDS`` and single characters."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(i) for i in range(33, 127) if not chr(i).isupper()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars if c.isalnum()]
    BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, do_lower_case=True).save_pretrained(folder)
    return folder


#: ImageReward's med_config.json with tiny sizes (its MLP head reads 768 features, so the width stays).
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 0,
    "encoder_width": 32, "add_cross_attention": True,
}


def make_tiny_imagereward(folder: Path, seed: int, monkeypatch) -> tuple[Path, Path, Path, object]:
    """A random ImageReward built by the package's own ``ImageReward`` class (BLIP's ViT with 2
    blocks of width 32 instead of ViT-L, a 1-layer BERT), saved as ``ImageReward.pt`` is. Returns the
    checkpoint, med_config.json, the tokenizer folder and the package's model (the reference scorer)."""
    scorer = load_imagereward_scorer()
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    tok_dir = write_bert_tokenizer(folder / "bert-base-uncased")
    med = folder / "med_config.json"
    med.write_text(json.dumps({**TINY_MED_CONFIG, "vocab_size": len(BertTokenizer.from_pretrained(tok_dir)) + 2}))

    def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return VisionTransformer(img_size=image_size, patch_size=32, embed_dim=32, depth=2, num_heads=2), 32

    class ScorerBert(BertTokenizer):
        @property
        def additional_special_tokens_ids(self):  # transformers 5 calls them extra special tokens
            return self.convert_tokens_to_ids([str(t) for t in self._extra_special_tokens])

    class LocalBert(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):  # the scorer asks the hub for bert-base-uncased
            assert name == "bert-base-uncased"
            return ScorerBert.from_pretrained(str(tok_dir), *args, **kwargs)

    from ImageReward.models.BLIP import med as med_module

    # med's BertModel ends its __init__ with init_weights() where transformers 5 expects post_init(),
    # which records the tied weights (none here) that init_weights() reads.
    original_init_weights = med_module.BertModel.init_weights

    def init_weights(self):
        if "all_tied_weights_keys" not in self.__dict__:
            self.all_tied_weights_keys = {}
        original_init_weights(self)

    monkeypatch.setattr(med_module.BertModel, "init_weights", init_weights)
    # Two mask helpers that transformers 4's PreTrainedModel had and med's forward calls.
    if not hasattr(med_module.BertModel, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
            return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min

        monkeypatch.setattr(med_module.BertModel, "invert_attention_mask", invert_attention_mask, raising=False)
    if not hasattr(med_module.BertModel, "get_head_mask"):
        monkeypatch.setattr(med_module.BertModel, "get_head_mask",
                            lambda self, head_mask, layers: [None] * layers if head_mask is None else head_mask,
                            raising=False)
    monkeypatch.setattr(blip_pretrain, "create_vit", tiny_vit)
    monkeypatch.setattr(blip, "BertTokenizer", LocalBert)
    torch.manual_seed(seed)
    model = scorer.ImageReward(med_config=str(med), device="cpu")
    perturb(model, seed)
    model.eval()
    ckpt = folder / "ImageReward.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt, med, tok_dir, model


def install_hpsv2_vocab() -> None:
    """hpsv2 1.2.0's wheel lacks the BPE vocabulary its tokenizer opens at import; it is the CLIP
    vocabulary open_clip ships, so copy that one beside it (run by `make venv`)."""
    import shutil

    hps = importlib.util.find_spec("hpsv2")
    oc = importlib.util.find_spec("open_clip")
    if hps is None or oc is None:
        raise SystemExit("hpsv2 and open_clip must be installed first")
    name = "bpe_simple_vocab_16e6.txt.gz"
    target = Path(next(iter(hps.submodule_search_locations))) / "src" / "open_clip" / name
    if not target.exists():
        shutil.copyfile(Path(next(iter(oc.submodule_search_locations))) / name, target)


if __name__ == "__main__":
    if sys.argv[1:] == ["install-hpsv2-vocab"]:
        install_hpsv2_vocab()
    else:
        raise SystemExit("usage: python tests/plugins/reward_refs.py install-hpsv2-vocab")
