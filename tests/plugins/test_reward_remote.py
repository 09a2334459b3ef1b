"""The reward server and the ``remote`` reward, against real servers on 127.0.0.1 started here."""

import base64
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import torch

from mixgrpo.commands.cli import main
from mixgrpo.core.interfaces import Reward, RewardUnavailable
from mixgrpo.core.scoring import call_reward
from mixgrpo.plugins.rewards.models import PickScoreReward
from mixgrpo.plugins.rewards.remote import (
    RemoteHPSv2Reward,
    RemotePickScoreReward,
    RemoteReward,
    RunningServer,
    encode_png,
    make_app,
)

from .reward_refs import PROMPTS, as_tensor, make_tiny_clip, textured_images

IMAGES = as_tensor(textured_images([(256, 320)] * 5, seed=21))


class Recording(Reward):
    """Wraps a reward (or a behaviour) and records the batch sizes it was called with."""

    name = "recording"
    version = "7"

    def __init__(self, behave) -> None:
        self.behave, self.calls = behave, []

    def __call__(self, images, prompts):
        self.calls.append(len(prompts))
        return self.behave(images, prompts)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture
def serve():
    running = []

    def start(reward, name="recording"):
        server = RunningServer(make_app(reward, name), host="127.0.0.1", port=0)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="module")
def pickscore(tmp_path_factory):
    folder = make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=4)
    return folder, PickScoreReward(str(folder), device="cpu")


def test_round_trip_equals_the_local_reward(serve, pickscore):
    _, local = pickscore
    server = serve(local, name="pickscore")
    remote = RemotePickScoreReward(url=server.url, batch_size=2)
    got = remote(IMAGES, PROMPTS[:5])
    want = local(IMAGES, PROMPTS[:5])
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # PNG is lossless: the same 8-bit pixels
    assert remote.version == local.version
    info = requests.get(f"{server.url}/info", timeout=5).json()
    assert info == {"reward": "pickscore", "version": local.version}


def test_batches_of_batch_size(serve):
    reward = Recording(brightness)
    server = serve(reward)
    scores = RemoteReward(url=server.url, reward="recording", batch_size=2)(IMAGES, PROMPTS[:5])
    assert reward.calls == [2, 2, 1]
    levels = (IMAGES.clamp(0, 1) * 255).round() / 255
    assert torch.allclose(scores, levels.mean(dim=(1, 2, 3)), atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_retried_for_its_patience_then_unavailable():
    remote = RemoteReward(url=f"http://127.0.0.1:{_free_port()}", patience=0.6, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(RewardUnavailable, match=r"could not be reached for 1 s \(\d+ attempts; RemoteReward.patience = "
                                                 r"0.6 s\): ConnectionError"):
        remote(IMAGES, PROMPTS[:5])
    assert 0.6 <= time.monotonic() - start < 3.0
    errors = {}  # the trainer's view: masked (never a silent 0), the cause kept for the decision to stop
    with pytest.warns(RuntimeWarning, match="could not be reached"):
        assert call_reward(remote, "remote", IMAGES, PROMPTS[:5], errors).isnan().all()
    assert isinstance(errors["remote"], RewardUnavailable)


def test_a_server_restarted_within_the_patience_loses_nothing():
    port = _free_port()
    started = []

    def restart_later():
        time.sleep(0.8)
        started.append(RunningServer(make_app(Recording(brightness), "recording"), host="127.0.0.1", port=port))

    thread = threading.Thread(target=restart_later)
    thread.start()
    try:
        scores = RemoteReward(url=f"http://127.0.0.1:{port}", patience=30, backoff=0.1, max_backoff=0.2)(
            IMAGES[:3], PROMPTS[:3])
    finally:
        thread.join()
        for server in started:
            server.stop()
    levels = (IMAGES[:3].clamp(0, 1) * 255).round() / 255
    assert torch.allclose(scores, levels.mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_without_its_server_counts_as_unreachable(status):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    hits = []

    async def score(request):
        hits.append(1)
        return Response("upstream down", status_code=status)

    server = RunningServer(Starlette(routes=[Route("/score", score, methods=["POST"])]))
    try:
        with pytest.raises(RewardUnavailable, match=f"HTTP {status}: upstream down"):
            RemoteReward(url=server.url, patience=0.3, backoff=0.05, retries=0)(IMAGES[:2], PROMPTS[:2])
    finally:
        server.stop()
    assert len(hits) >= 3  # retried through the patience, not given up after `retries`


def test_slow_server_times_out(serve):
    def slow(images, prompts):
        time.sleep(1.0)
        return brightness(images, prompts)

    reward = Recording(slow)
    server = serve(reward)
    remote = RemoteReward(url=server.url, timeout=0.25, retries=1, backoff=0.05)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"after 2 attempt\(s\) \(.*(Timeout|timed out)"), \
            pytest.raises(RuntimeError, match=r"scored none of 2 images: .*after 2 attempt\(s\): ReadTimeout"):
        remote(IMAGES[:2], PROMPTS[:2])
    assert time.monotonic() - start < 1.9  # two 0.25 s timeouts and a backoff, not the 2 s the server takes
    time.sleep(1.1)  # let the server's threads finish before it is stopped
    assert len(reward.calls) == 2


def test_server_error_is_retried_then_masked(serve):
    def broken(images, prompts):
        raise RuntimeError("CUDA out of memory")

    reward = Recording(broken)
    server = serve(reward)
    with pytest.warns(RuntimeWarning, match=r"after 3 attempt\(s\) \(HTTP 500: .*CUDA out of memory"), \
            pytest.raises(RuntimeError, match="scored none of 3 images: .*HTTP 500: .*CUDA out of memory"):
        RemoteReward(url=server.url, retries=2, backoff=0.01)(IMAGES[:3], PROMPTS[:3])
    assert len(reward.calls) == 3


def test_a_transient_failure_is_retried(serve):
    state = {"n": 0}

    def flaky(images, prompts):
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("transient")
        return brightness(images, prompts)

    server = serve(Recording(flaky))
    scores = RemoteReward(url=server.url, retries=1, backoff=0.01)(IMAGES[:3], PROMPTS[:3])
    assert not scores.isnan().any() and state["n"] == 2


@pytest.mark.parametrize("reply", ["not json", '{"scores": [1.0]}', '{"scores": [1, "x", 3]}', '[1, 2, 3]'])
def test_malformed_replies_are_retried_then_masked(serve, reply):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    hits = []

    async def score(request):
        hits.append(1)
        return Response(reply, media_type="application/json")

    server = RunningServer(Starlette(routes=[Route("/score", score, methods=["POST"])]))
    try:
        with pytest.warns(RuntimeWarning, match="malformed reply"), pytest.raises(RuntimeError, match="malformed"):
            RemoteReward(url=server.url, retries=1, backoff=0.01)(IMAGES[:3], PROMPTS[:3])
    finally:
        server.stop()
    assert len(hits) == 2


def test_a_server_of_another_reward_is_refused(serve):
    server = serve(Recording(brightness), name="pickscore")
    with pytest.warns(RuntimeWarning, match="serves reward 'pickscore', not 'hpsv2'"), \
            pytest.raises(RuntimeError, match="serves reward 'pickscore', not 'hpsv2'"):
        RemoteHPSv2Reward(url=server.url, retries=0)(IMAGES[:2], PROMPTS[:2])


def test_nan_scores_travel_as_null(serve):
    def half(images, prompts):
        s = brightness(images, prompts)
        s[0], s[2] = float("nan"), float("inf")
        return s

    server = serve(Recording(half))
    scores = RemoteReward(url=server.url)(IMAGES[:3], PROMPTS[:3])
    assert scores[0].isnan() and scores[1].isfinite() and scores[2].isnan()


def test_bad_requests_are_answered_400_with_the_problem(serve):
    reward = Recording(brightness)
    server = serve(reward)
    png = encode_png(torch.full((3, 8, 8), 7.0))

    def post(body):
        return requests.post(f"{server.url}/score", json=body, timeout=5)

    r = post({"prompts": ["a", "b"], "images": [png]})
    assert r.status_code == 400 and "one prompt per image" in r.json()["error"]
    r = post({"prompts": ["a"], "images": [base64.b64encode(b"GIF89a").decode()]})
    assert r.status_code == 400 and "not a base64 PNG" in r.json()["error"]
    r = requests.post(f"{server.url}/score", data=b"\x80\x03pickle", timeout=5)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    # images of two sizes in one request are scored per size, in order
    other = encode_png(torch.full((3, 4, 6), 200.0))
    r = post({"prompts": ["a", "b", "c"], "images": [png, other, png]})
    assert r.status_code == 200 and reward.calls == [2, 1]
    assert np.allclose(r.json()["scores"], [7 / 255, 200 / 255, 7 / 255], atol=1e-6)
    with pytest.warns(RuntimeWarning, match="HTTP 400"):  # a client error is not retried
        RemoteReward(url=server.url, retries=3, backoff=5.0)._request({"prompts": [], "images": [png]}, 1)


def test_client_configuration_errors_name_the_binding():
    with pytest.raises(ValueError, match=r"RemoteReward\.url is not set.*serve-reward"):
        RemoteReward()
    with pytest.raises(ValueError, match="http://"):
        RemotePickScoreReward(url="rewardhost:8700")


def test_serve_reward_command(pickscore, tmp_path):
    folder, local = pickscore
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixgrpo", "serve-reward", "pickscore", "--port", str(port),
                             "--gin", f"PickScoreReward.path = '{folder}'", "--gin", "PickScoreReward.device = 'cpu'"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            try:
                info = requests.get(f"{url}/info", timeout=2).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None, "".join(out)
                assert time.monotonic() < deadline, "the server did not start: " + "".join(out)
                time.sleep(0.3)
        assert info == {"reward": "pickscore", "version": local.version}
        got = RemotePickScoreReward(url=url)(IMAGES[:3], PROMPTS[:3])
        assert torch.allclose(got, local(IMAGES[:3], PROMPTS[:3]), atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_reward_of_an_unknown_name_fails_with_the_known_names(capsys):
    assert main(["serve-reward", "hpsv3"]) == 2
    err = capsys.readouterr().err
    assert "hpsv3" in err and "hpsv2" in err
