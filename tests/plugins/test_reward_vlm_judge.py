"""The VLM judge against a fake OpenAI-compatible chat-completions server started here on 127.0.0.1.

The fake reads what a real server would (the model, the data-URL image, the text) and answers as a
judge would: its score is a function of the image it decoded, so a score that comes back proves the
image and the caption travelled; the caption selects a behaviour (good answers, bare numbers,
malformed answers, a slow answer past the timeout, a 500, a transient 500).
"""

import asyncio
import base64
import io
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.core.interfaces import RewardUnavailable
from mixgrpo.core.scoring import call_reward
from mixgrpo.plugins.rewards.remote import RunningServer
from mixgrpo.plugins.rewards.vlm_judge import DEFAULT_PATTERNS, VLMJudgeReward, compile_patterns, parse_score
from mixgrpo.testing.rewards import RewardContract

from .reward_refs import as_tensor, textured_images

IMAGES = as_tensor(textured_images([(48, 40)] * 6, seed=8))
TEMPLATE = "Rate this. Caption: {caption}"


def judged(levels_mean: float) -> float:
    """The fake judge's rating of an image whose mean 8-bit level is ``levels_mean``: 1..5."""
    return 1.0 + 4.0 * levels_mean / 255.0


def _expected(images: torch.Tensor) -> np.ndarray:
    """Independent: the 8-bit levels numpy gives, rated, divided by 5 (flow_grpo's normalisation)."""
    levels = np.clip(np.round(images.numpy().astype(np.float64) * 255), 0, 255)
    return np.round([judged(a.mean()) for a in levels], 4) / 5.0


class FakeJudge:
    """A Starlette app in the shape of vLLM's ``/v1/chat/completions``, recording what it was sent."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.sizes: list[tuple[int, int]] = []
        self.in_flight = self.max_in_flight = 0
        self.auth: list[str | None] = []

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def chat(request):
            body = await request.json()
            self.auth.append(request.headers.get("authorization"))
            parts = body["messages"][0]["content"]
            if body.get("model") != "judge-7b" or [p["type"] for p in parts] != ["image_url", "text"]:
                return JSONResponse({"error": "bad request"}, status_code=400)
            url = parts[0]["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
            self.sizes.append(image.shape[:2])
            caption = parts[1]["text"].removeprefix("Rate this. Caption: ")
            self.hits[caption] = self.hits.get(caption, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self.answer(caption, judged(image.astype(np.float64).mean()))
            finally:
                self.in_flight -= 1

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

    async def answer(self, caption: str, rating: float):
        from starlette.responses import JSONResponse, Response

        def say(text):
            return JSONResponse({"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

        if caption.startswith("busy"):
            await asyncio.sleep(0.15)
        if caption.startswith("slow"):
            await asyncio.sleep(1.0)
        if caption.startswith("boom"):
            return Response("CUDA out of memory", status_code=500)
        if caption.startswith("flaky") and self.hits[caption] == 1:
            return Response("transient", status_code=500)
        if caption.startswith("garbled"):
            return say("I would rather not say.")
        if caption.startswith("outside"):
            return say("Final Score: 9")
        if caption.startswith("notjson"):
            return Response("<html>oops</html>", status_code=200)
        if caption.startswith("bare"):
            return say(f"{rating:.4f}")
        return say(f"The layout matches the caption.\n**Final Score:** {rating:.4f}")


@pytest.fixture(scope="module")
def judge():
    fake = FakeJudge()
    server = RunningServer(fake.app())
    yield fake, f"{server.url}/v1"
    server.stop()


def _reward(url, **kw):
    return VLMJudgeReward(url=url, model="judge-7b", template=TEMPLATE, **{"backoff": 0.01, **kw})


def test_good_and_bare_answers_equal_the_judges_rating(judge):
    fake, url = judge
    prompts = ["good a", "bare b", "good c", "bare d", "good e", "good f"]
    got = _reward(url, concurrency=3)(IMAGES, prompts)
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), _expected(IMAGES), atol=1e-6)
    assert np.ptp(got.numpy()) > 0.01  # the images were told apart by what the server decoded
    assert all(size == (48, 40) for size in fake.sizes[-6:])


def test_normalisations_and_resizing(judge):
    fake, url = judge
    want = _expected(IMAGES[:2]) * 5
    raw = _reward(url, normalize="none", image_size=32)(IMAGES[:2], ["good g", "good h"])
    assert fake.sizes[-2:] == [(32, 32), (32, 32)]
    assert np.abs(raw.numpy() - want).max() < 0.05  # a resize moves the mean level a little
    unit = _reward(url, normalize="range")(IMAGES[:2], ["good i", "good j"])
    np.testing.assert_allclose(unit.numpy(), (want - 1) / 4, atol=1e-6)


def test_concurrency_is_bounded(judge):
    fake, url = judge
    fake.max_in_flight = 0
    images = IMAGES.repeat(2, 1, 1, 1)
    start = time.monotonic()
    _reward(url, concurrency=3)(images, [f"busy {i}" for i in range(12)])
    assert fake.max_in_flight == 3
    assert time.monotonic() - start < 12 * 0.15  # concurrent, not one by one


def test_unreadable_answers_are_masked_not_zero_and_not_retried(judge):
    fake, url = judge
    prompts = ["good k", "garbled l", "outside m", "notjson n", "good o"]
    with pytest.warns(RuntimeWarning, match=r"3 of 5 images score NaN .*2 unreadable answer\(s\), first: no score "
                                            r"in the answer 'I would rather not say\.'.*1 failed request\(s\), "
                                            r"first: after 2 attempt\(s\): malformed reply"):
        got = _reward(url, retries=1)(IMAGES[:5], prompts)
    assert got[1].isnan() and got[2].isnan() and got[3].isnan()
    np.testing.assert_allclose(got[[0, 4]].numpy(), _expected(IMAGES[[0, 4]]), atol=1e-6)
    assert fake.hits["garbled l"] == 1 and fake.hits["outside m"] == 1 and fake.hits["notjson n"] == 2


def test_a_500_is_retried_then_masked_and_a_transient_one_recovers(judge):
    fake, url = judge
    with pytest.warns(RuntimeWarning, match=r"1 of 2 images score NaN .*after 3 attempt\(s\): HTTP 500: CUDA out of"):
        got = _reward(url, retries=2)(IMAGES[:2], ["boom p", "flaky q"])
    assert got[0].isnan() and fake.hits["boom p"] == 3
    assert fake.hits["flaky q"] == 2 and got[1].item() == pytest.approx(_expected(IMAGES[1:2])[0], abs=1e-6)


def test_a_slow_answer_times_out_and_is_masked(judge):
    fake, url = judge
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"after 2 attempt\(s\): .*(Timeout|timed out)"):
        got = _reward(url, timeout=0.25, retries=1)(IMAGES[:2], ["slow r", "good s"])
    assert got[0].isnan() and got[1].isfinite()
    assert time.monotonic() - start < 1.5  # two 0.25 s timeouts, not the 2 s the server takes
    time.sleep(1.0)  # let the server's pending answers finish


def test_nothing_scored_raises_with_the_cause_and_the_trainer_masks_it(judge):
    _, url = judge
    reward = _reward(url, retries=0)
    with pytest.raises(RuntimeError, match="scored none of 2 images: 2 failed request.*HTTP 500"):
        reward(IMAGES[:2], ["boom t", "boom u"])
    errors = {}
    with pytest.warns(RuntimeWarning, match="they are masked out"):
        assert call_reward(reward, "vlm_judge", IMAGES[:2], ["boom t", "boom u"], errors).isnan().all()
    assert "vlm_judge" in errors


def test_an_unreachable_server_is_retried_for_its_patience_then_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = _reward(f"http://127.0.0.1:{port}/v1", patience=0.5, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(RewardUnavailable, match=r"could not be reached for 1 s \(\d+ attempts; "
                                                r"VLMJudgeReward\.patience = 0\.5 s\): ConnectionError"):
        reward(IMAGES[:3], ["good"] * 3)
    assert 0.5 <= time.monotonic() - start < 3.0


def test_api_key_and_request_settings_are_sent(judge):
    fake, url = judge
    reward = _reward(url, api_key="sk-test")
    reward(IMAGES[:1], ["good v"])
    assert fake.auth[-1] == "Bearer sk-test"
    body = reward.body("data:image/png;base64,AAAA", 'a "quoted" {caption}')
    assert body["temperature"] == 0.0 and body["max_tokens"] == 512
    assert body["messages"][0]["content"][1]["text"] == 'Rate this. Caption: a "quoted" {caption}'


@pytest.mark.parametrize("text, want", [
    ("Final Score: 4.5", 4.5), ("final score:3", 3.0), ("Reasoning...\n**Final Score:** 2.25\n", 2.25),
    ("  4 ", 4.0), ("5.", 5.0), ("Score 4 of 5", None), ("Final Score: none", None), ("", None)])
def test_default_patterns(text, want):
    assert parse_score(text, compile_patterns(None)) == want
    assert len(DEFAULT_PATTERNS) == 2


def test_a_custom_pattern_and_configuration_errors():
    assert parse_score("rating=7/10", compile_patterns(r"rating=(\d+)/10")) == 7.0
    with pytest.raises(ValueError, match=r"VLMJudgeReward\.pattern = .* is not a regular expression"):
        compile_patterns("(")
    with pytest.raises(ValueError, match=r"VLMJudgeReward\.url is not set"):
        VLMJudgeReward(model="m")
    with pytest.raises(ValueError, match=r"VLMJudgeReward\.model is not set"):
        VLMJudgeReward(url="http://h:1/v1")
    with pytest.raises(ValueError, match="no {caption} placeholder"):
        VLMJudgeReward(url="http://h:1/v1", model="m", template="Rate it")
    with pytest.raises(ValueError, match="score_range must be"):
        VLMJudgeReward(url="http://h:1/v1", model="m", score_range=(5, 1))
    with pytest.raises(ValueError, match="normalize must be one of"):
        VLMJudgeReward(url="http://h:1/v1", model="m", normalize="z")
    assert _reward("http://h:1/v1/").endpoint == "http://h:1/v1/chat/completions"


class TestVLMJudgeContract(RewardContract):
    @pytest.fixture(autouse=True)
    def _server(self, judge):
        self.url = judge[1]

    def make_reward(self):
        return _reward(self.url, concurrency=2)
