"""Remote rewards: serve any registered reward over HTTP, and the ``remote`` reward that calls it.

A reward model that needs its own environment (another torch, an old transformers) or its own
machine runs under ``mixgrpo serve-reward NAME``; training binds ``RemoteReward.url`` to it.

Protocol (JSON both ways, images as base64 PNG, never pickle):

* ``POST /score`` with ``{"prompts": [str, ...], "images": [base64 PNG, ...]}`` (one prompt per image)
  answers ``{"reward": NAME, "version": VERSION, "scores": [float or null, ...]}``, one score per image
  in order (null for an image the reward could not score). A malformed request answers 400, a reward
  that raises answers 500, both with ``{"error": message}``.
* ``GET /info`` answers ``{"reward": NAME, "version": VERSION}``.

PNG is lossless, and the client sends the 8-bit images that saving the samples would give, which is
also what every local reward scores: a remote score equals the local one.

The server is Starlette on uvicorn (the ``serve`` extra); the client uses requests. A server it
cannot reach (a restart, a preempted node) is retried with exponential backoff for
``RemoteReward.patience`` seconds (10 minutes by default), then the run stops with a checkpoint of
its last completed iteration and the connection error as the cause. An answer that is the reward's
own failure (HTTP 500) or malformed is retried ``retries`` times, then that batch scores NaN with a
warning: NaN rewards are masked out of the advantages, where a silent 0 would be a strong negative
signal.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward
from mixgrpo.plugins.rewards.preprocess import check_batch, chunks, to_uint8_levels

# -- encoding ---------------------------------------------------------------------------------------


def encode_png(levels: torch.Tensor) -> str:
    """One image of 8-bit levels ``[3, H, W]`` → base64 PNG text."""
    from PIL import Image

    array = levels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """base64 PNG text → ``H×W×3`` uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
        if im.format != "PNG":
            raise ValueError(f"expected a PNG image, got {im.format}")
        return np.asarray(im.convert("RGB"))


def reward_version(reward: Reward) -> str:
    return str(getattr(reward, "version", None) or "unversioned")


# -- server -----------------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request the server cannot score (answered 400)."""


def score_request(reward: Reward, body: Any, max_images: int) -> list[float | None]:
    """Validate a ``/score`` body and score it; images of different sizes are scored per size."""
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), list) or not isinstance(
            body.get("images"), list):
        raise BadRequest('expected a JSON object {"prompts": [str, ...], "images": [base64 PNG, ...]}')
    prompts, images = body["prompts"], body["images"]
    if len(prompts) != len(images):
        raise BadRequest(f"{len(images)} images but {len(prompts)} prompts (one prompt per image)")
    if len(images) > max_images:
        raise BadRequest(f"{len(images)} images in one request; this server takes at most {max_images}")
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(i, str) for i in images):
        raise BadRequest("prompts and images must be strings (images as base64 PNG)")
    arrays = []
    for k, text in enumerate(images):
        try:
            arrays.append(decode_png(text))
        except Exception as exc:
            raise BadRequest(f"image {k} is not a base64 PNG ({type(exc).__name__}: {exc})") from None
    scores: list[float | None] = [None] * len(arrays)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, a in enumerate(arrays):
        by_size.setdefault(a.shape, []).append(k)
    for rows in by_size.values():
        batch = torch.stack([torch.from_numpy(arrays[k].copy()).permute(2, 0, 1) for k in rows]).float() / 255.0
        out = reward(batch, [prompts[k] for k in rows])
        out = torch.as_tensor(out).detach().float().cpu().reshape(-1)
        if out.numel() != len(rows):
            raise RuntimeError(f"the reward returned {out.numel()} scores for {len(rows)} images")
        for k, v in zip(rows, out.tolist()):
            scores[k] = float(v) if math.isfinite(v) else None  # NaN/inf → null (JSON has neither)
    return scores


def make_app(reward: Reward, name: str, max_images: int = 256):
    """The Starlette application serving ``reward`` under ``name``; one reward call at a time."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock = threading.Lock()
    version = reward_version(reward)

    def locked_score(body: Any) -> list[float | None]:
        with lock:
            with torch.no_grad():
                return score_request(reward, body, max_images)

    async def score(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except Exception:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        try:
            scores = await run_in_threadpool(locked_score, body)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # the reward itself failed: the client retries, then masks
            return JSONResponse({"error": f"reward {name!r} failed: {type(exc).__name__}: {exc}"}, status_code=500)
        return JSONResponse({"reward": name, "version": version, "scores": scores})

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"reward": name, "version": version})

    return Starlette(routes=[Route("/score", score, methods=["POST"]), Route("/info", info, methods=["GET"])])


class RunningServer:
    """A uvicorn server in a background thread (tests, notebooks); ``stop()`` shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start on {host}:{port}")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(reward: Reward, name: str, host: str = "127.0.0.1", port: int = 8700, max_images: int = 256) -> None:
    """Serve ``reward`` until interrupted (``mixgrpo serve-reward``)."""
    import uvicorn

    uvicorn.run(make_app(reward, name, max_images), host=host, port=port, log_level="info")


# -- client -----------------------------------------------------------------------------------------


#: HTTP answers of a proxy or load balancer whose reward server is down: the server is unreachable
UNREACHABLE_STATUS = (502, 503, 504)


def attempt(post: Callable[[], Any]) -> tuple[bool, Any, str]:
    """One HTTP request ``post()``: ``(unreachable, reply or None, error)``. Unreachable: the connection
    failed (refused, reset, no route, a connect timeout) or a proxy answered 502/503/504; a read timeout
    means the server is there but slow."""
    import requests

    try:
        reply = post()
    except requests.ConnectionError as exc:
        return True, None, f"{type(exc).__name__}: {exc}"
    except requests.RequestException as exc:
        return False, None, f"{type(exc).__name__}: {exc}"
    error = "" if reply.status_code == 200 else f"HTTP {reply.status_code}: {reply.text[:300]}"
    return reply.status_code in UNREACHABLE_STATUS, reply, error


def with_retries(post: Callable[[], Any], parse: Callable[[Any], Any], *, patience: float, retries: int,
                 backoff: float, max_backoff: float,
                 unavailable: Callable[[float, int, str], str]) -> tuple[Any, int, str]:
    """``(parse(reply), attempts, "")`` of the first answer that parses, or ``(None, attempts, error)``.

    The rules of the ``remote`` reward and the VLM judge: while the server cannot be reached, retry
    with exponential backoff (``backoff · 2^k`` s, at most ``max_backoff``) and raise
    ``RewardUnavailable(unavailable(seconds down, attempts, error))`` once it has been down for
    ``patience`` seconds; an answer that fails (a 5xx, a read timeout, a reply ``parse`` rejects with
    ValueError, TypeError, KeyError or IndexError) is retried ``retries`` times; a 4xx is not retried
    (the request itself is wrong)."""
    from mixgrpo.core.interfaces import RewardUnavailable

    attempts, failed_answers, down_since, error = 0, 0, None, ""
    while True:
        if attempts:
            remaining = None if down_since is None else patience - (time.monotonic() - down_since)
            pause = min(backoff * 2 ** min(attempts - 1, 30), max_backoff)
            time.sleep(max(0.0, pause if remaining is None else min(pause, remaining)))
        attempts += 1
        unreachable, reply, error = attempt(post)
        if unreachable:
            down_since = time.monotonic() if down_since is None else down_since
            down = time.monotonic() - down_since
            if down >= patience:
                raise RewardUnavailable(unavailable(down, attempts, error))
            continue
        down_since = None
        if reply is not None and reply.status_code == 200:
            try:
                return parse(reply), attempts, ""
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                error = f"malformed reply: {type(exc).__name__}: {exc}"
        elif reply is not None and 400 <= reply.status_code < 500:
            return None, attempts, error
        failed_answers += 1
        if failed_answers > retries:
            return None, attempts, error


class RemoteReward(Reward):
    """Scores images with a reward served by ``mixgrpo serve-reward``.

    Args:
        url: the server, e.g. ``http://rewardhost:8700``.
        reward: the served reward's name; a reply naming another reward counts as malformed (so a
            run never trains on the wrong model). ``None`` accepts any.
        timeout: seconds to wait for one request.
        patience: seconds the client keeps retrying a server it cannot reach (connection refused or
            reset, a connect timeout, HTTP 502/503/504), waiting ``backoff`` seconds and doubling up to
            ``max_backoff``; then it raises ``RewardUnavailable`` and the run stops with a checkpoint
            of its last completed iteration (``mixgrpo train RUN --resume`` continues it). Restart a
            server within this time and nothing is lost.
        retries: further attempts after an answer that is an error of the reward itself (HTTP 500),
            a malformed reply or no reply within ``timeout``; after the last, that batch scores NaN
            (masked, counted), and a call in which no batch scored raises the server's own error.
        backoff: seconds before the first retry, doubled before each next one.
        max_backoff: the longest wait between two attempts.
        batch_size: images per request.
    """

    name = "remote"

    def __init__(self, url: str | None = None, reward: str | None = None, timeout: float = 120.0,
                 patience: float = 600.0, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 batch_size: int = 16) -> None:
        import requests

        from mixgrpo.plugins.rewards.models import require_set

        require_set(url, f"{type(self).__name__}.url")
        cls = type(self).__name__
        if not url:
            raise ValueError(f"{cls}.url is not set: bind it to the server that `mixgrpo serve-reward NAME --port "
                             f"PORT` runs (gin: {cls}.url = 'http://host:PORT')")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{cls}.url = {url!r} must start with http:// or https://")
        if timeout <= 0 or patience < 0 or retries < 0 or backoff < 0 or max_backoff < 0 or batch_size < 1:
            raise ValueError(f"{cls}: need timeout > 0, patience >= 0, retries >= 0, backoff >= 0, max_backoff >= 0 "
                             f"and batch_size >= 1 (got timeout={timeout}, patience={patience}, retries={retries}, "
                             f"backoff={backoff}, max_backoff={max_backoff}, batch_size={batch_size})")
        self.url = url.rstrip("/")
        self.reward = reward if reward is not None else self.reward_default
        self.timeout, self.patience, self.retries = float(timeout), float(patience), int(retries)
        self.backoff, self.max_backoff, self.batch_size = float(backoff), float(max_backoff), int(batch_size)
        self.session = requests.Session()
        self.version: str | None = None  # the server's, once it answered
        self.last_error: str | None = None  # of the last request that scored nothing

    reward_default: str | None = None

    def _parse(self, reply, n: int) -> torch.Tensor:
        body = reply.json()
        if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
            raise ValueError('no "scores" list in the reply')
        if self.reward is not None and body.get("reward") != self.reward:
            raise ValueError(f"the server serves reward {body.get('reward')!r}, not {self.reward!r}")
        scores = body["scores"]
        if len(scores) != n:
            raise ValueError(f"{len(scores)} scores for {n} images")
        if not all(s is None or (isinstance(s, int | float) and not isinstance(s, bool)) for s in scores):
            raise ValueError("scores must be numbers or null")
        self.version = str(body.get("version"))
        return torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float32)

    def _request(self, payload: dict, n: int) -> torch.Tensor | None:
        """Scores of one batch, or None (with ``last_error``) when the server answered but could not
        score it; ``RewardUnavailable`` when it could not be reached for ``patience`` seconds."""
        scores, attempts, error = with_retries(
            lambda: self.session.post(f"{self.url}/score", json=payload, timeout=self.timeout),
            lambda reply: self._parse(reply, n), patience=self.patience, retries=self.retries,
            backoff=self.backoff, max_backoff=self.max_backoff,
            unavailable=lambda down, tries, err: (
                f"the reward server {self.url} ({self.reward or 'remote'}) could not be reached for {down:.0f} s "
                f"({tries} attempts; {type(self).__name__}.patience = {self.patience:g} s): {err}"))
        if scores is not None:
            return scores
        self.last_error = f"{self.url} after {attempts} attempt(s): {error}"
        warnings.warn(f"remote reward {self.reward or ''}@{self.url} failed on {n} images after {attempts} "
                      f"attempt(s) ({error}); they score NaN and are masked out", RuntimeWarning, stacklevel=3)
        return None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts, type(self).__name__)
        levels = to_uint8_levels(images).cpu()
        scores = torch.full((len(prompts),), float("nan"), dtype=torch.float32)
        answered = False
        for part in chunks(len(prompts), self.batch_size):
            payload = {"prompts": prompts[part], "images": [encode_png(img) for img in levels[part]]}
            got = self._request(payload, len(payload["prompts"]))
            if got is not None:
                scores[part], answered = got, True
        if not answered and prompts:  # nothing scored: the server's own error is the cause, not "NaN"
            raise RuntimeError(f"the reward server scored none of {len(prompts)} images: {self.last_error}")
        return scores.to(images.device)


def _remote_for(reward_name: str, class_name: str) -> type[RemoteReward]:
    return type(class_name, (RemoteReward,), {"name": f"remote.{reward_name}", "reward_default": reward_name,
                                              "__module__": __name__,
                                              "__doc__": f"``RemoteReward`` expecting the served {reward_name!r}."})


RemoteHPSv2Reward = _remote_for("hpsv2", "RemoteHPSv2Reward")
RemotePickScoreReward = _remote_for("pickscore", "RemotePickScoreReward")
RemoteImageRewardReward = _remote_for("imagereward", "RemoteImageRewardReward")
RemoteCLIPScoreReward = _remote_for("clip_score", "RemoteCLIPScoreReward")


@hookimpl
def register_rewards(register):
    register("remote", RemoteReward)
    # One name per served model, so that a recipe can train on several remote rewards at once, each
    # with its own gin bindings (RemoteHPSv2Reward.url, RemotePickScoreReward.url, ...).
    register("remote.hpsv2", RemoteHPSv2Reward)
    register("remote.pickscore", RemotePickScoreReward)
    register("remote.imagereward", RemoteImageRewardReward)
    register("remote.clip_score", RemoteCLIPScoreReward)


def _configure_server(parser) -> None:
    parser.add_argument("name", help="registered reward name (see `mixgrpo plugins`), e.g. hpsv2")
    parser.add_argument("--port", type=int, default=8700, help="TCP port (default 8700)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 serves other machines)")
    parser.add_argument("--gin", action="append", metavar="FILE.gin|BINDING",
                        help="a .gin file or a binding configuring the reward, e.g. "
                             "--gin \"HPSv2Reward.checkpoint = '/models/HPS_v2.1_compressed.pt'\" (repeatable)")
    parser.add_argument("--max-images", type=int, default=256, help="largest batch one request may send")


def _run_server(args) -> int:
    from mixgrpo.core.config import parse_gin

    given = list(args.gin or [])
    files = [g for g in given if g.strip().endswith(".gin")]
    pm = parse_gin(files, [g for g in given if g not in files])
    reward = pm.create("reward", args.name)
    print(f"serving reward {args.name!r} on http://{args.host}:{args.port} (POST /score, GET /info)", flush=True)
    serve(reward, args.name, host=args.host, port=args.port, max_images=args.max_images)
    return 0


@hookimpl
def register_commands(register):
    register("serve-reward", "serve a registered reward over HTTP for the `remote` reward", _configure_server,
             _run_server)
