"""experiments/flux/: MixGRPO's multi-reward recipes, with every reward path a macro to bind."""

from pathlib import Path

import gin
import pytest

from mixgrpo.core.config import TrainConfig, parse_gin
from mixgrpo.plugins.rewards.imagereward import ImageRewardReward
from mixgrpo.plugins.rewards.models import HPSv2Reward, PickScoreReward
from mixgrpo.plugins.rewards.remote import RemoteHPSv2Reward, RunningServer, make_app

from .reward_refs import PROMPTS, as_tensor, make_tiny_clip, make_tiny_hps, make_tiny_imagereward, textured_images

FLUX = Path(__file__).resolve().parents[2] / "experiments" / "flux"
BASE = ["FLUX_PATH = '/nonexistent/flux'", "PROMPTS_TRAIN = '/nonexistent/train.txt'",
        "PROMPTS_TEST = '/nonexistent/test.txt'"]
LOCAL = {"HPS_CHECKPOINT": ("hpsv2", "HPSv2Reward.checkpoint"),
         "PICKSCORE_PATH": ("pickscore", "PickScoreReward.path"),
         "IMAGEREWARD_CHECKPOINT": ("imagereward", "ImageRewardReward.checkpoint"),
         "IMAGEREWARD_MED_CONFIG": ("imagereward", "ImageRewardReward.med_config"),
         "BERT_TOKENIZER_PATH": ("imagereward", "ImageRewardReward.tokenizer")}
REMOTE = {"HPS_URL": ("remote.hpsv2", "RemoteHPSv2Reward.url"),
          "PICKSCORE_URL": ("remote.pickscore", "RemotePickScoreReward.url"),
          "IMAGEREWARD_URL": ("remote.imagereward", "RemoteImageRewardReward.url")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints in the published layouts, and the bindings that point the recipe at them."""
    root = tmp_path_factory.mktemp("models")
    hps_ckpt, hps_config = make_tiny_hps(root / "hps", seed=5)
    clip = make_tiny_clip(root / "pickscore", seed=6)
    with pytest.MonkeyPatch.context() as mp:
        ir_ckpt, med, tok, _ = make_tiny_imagereward(root / "imagereward", seed=7, monkeypatch=mp)
    paths = {"HPS_CHECKPOINT": hps_ckpt, "PICKSCORE_PATH": clip, "IMAGEREWARD_CHECKPOINT": ir_ckpt,
             "IMAGEREWARD_MED_CONFIG": med, "BERT_TOKENIZER_PATH": tok}
    # the tiny models' structure (the recipe's defaults describe the real ViT-H-14 and ViT-L)
    extra = [f"HPSv2Reward.architecture = '{hps_config}'", "ImageRewardReward.vision_heads = 2",
             "HPSv2Reward.device = 'cpu'", "PickScoreReward.device = 'cpu'", "ImageRewardReward.device = 'cpu'",
             "HPSv2Reward.dtype = 'float32'", "PickScoreReward.dtype = 'float32'",
             "ImageRewardReward.dtype = 'float32'"]
    return paths, extra


@pytest.mark.parametrize("recipe", ["mixgrpo_multi_reward", "mixgrpo_flash_multi_reward"])
def test_local_recipes_train_on_the_three_rewards_with_equal_weights(recipe, tiny):
    paths, extra = tiny
    pm = parse_gin([FLUX / f"{recipe}.gin"], BASE + [f"{m} = '{p}'" for m, p in paths.items()] + extra)
    cfg = TrainConfig()
    assert cfg.rewards == {"hpsv2": 1.0, "pickscore": 1.0, "imagereward": 1.0}
    assert cfg.objective == "mixgrpo" and cfg.backbone == "flux"
    for macro, (_, binding) in LOCAL.items():
        assert gin.query_parameter(binding).scoped_selector == f"{macro}/gin.macro"
        assert gin.query_parameter(f"{macro}/macro.value") == str(paths[macro])
    if recipe != "mixgrpo_multi_reward":
        return  # the same flux/rewards.gin: its rewards are built once, below
    images = as_tensor(textured_images([(720, 720)] * 2, seed=31))
    for name, cls in (("hpsv2", HPSv2Reward), ("pickscore", PickScoreReward), ("imagereward", ImageRewardReward)):
        reward = pm.create("reward", name)
        assert isinstance(reward, cls)
        assert reward(images, PROMPTS[:2]).isfinite().all()


@pytest.mark.parametrize("macro", sorted(LOCAL))
def test_an_unbound_reward_path_is_named(macro, tiny):
    paths, extra = tiny
    bound = [f"{m} = '{p}'" for m, p in paths.items() if m != macro]
    pm = parse_gin([FLUX / "mixgrpo_multi_reward.gin"], BASE + bound + extra)
    name, binding = LOCAL[macro]
    with pytest.raises(ValueError, match=rf"gin macro {macro} is not set \(it gives {binding}\).*--gin"):
        pm.create("reward", name)


def test_remote_recipe_uses_the_served_rewards(tmp_path):
    pm = parse_gin([FLUX / "mixgrpo_remote_rewards.gin"], BASE + ["HPS_URL = 'http://127.0.0.1:1'"])
    assert TrainConfig().rewards == {"remote.hpsv2": 1.0, "remote.pickscore": 1.0, "remote.imagereward": 1.0}
    assert isinstance(pm.create("reward", "remote.hpsv2"), RemoteHPSv2Reward)
    for macro in ("PICKSCORE_URL", "IMAGEREWARD_URL"):
        name, binding = REMOTE[macro]
        with pytest.raises(ValueError, match=rf"gin macro {macro} is not set \(it gives {binding}\)"):
            pm.create("reward", name)


def test_remote_recipe_scores_through_a_server(tiny):
    """serve-reward's app serving the recipe's HPS model; the remote recipe's client scores as it does."""
    paths, extra = tiny
    pm = parse_gin([FLUX / "rewards.gin"], [f"HPS_CHECKPOINT = '{paths['HPS_CHECKPOINT']}'"] + extra)
    local = pm.create("reward", "hpsv2")
    server = RunningServer(make_app(local, "hpsv2"))
    try:
        pm = parse_gin([FLUX / "mixgrpo_remote_rewards.gin"], BASE + [f"HPS_URL = '{server.url}'"])
        remote = pm.create("reward", "remote.hpsv2")
        images = as_tensor(textured_images([(300, 300)] * 3, seed=32))
        got, want = remote(images, PROMPTS[:3]), local(images, PROMPTS[:3])
        assert (got - want).abs().max() < 1e-6
    finally:
        server.stop()
