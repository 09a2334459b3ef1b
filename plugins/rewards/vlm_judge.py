"""A VLM judge scored through any OpenAI-compatible chat-completions server.

flow_grpo's UnifiedReward task (``unifiedreward_score_sglang`` in ``flow_grpo/rewards.py``) asks a
vision-language model, served by SGLang, to rate each image against its caption and reads the
number after ``Final Score:`` (1..5), divided by 5. ``VLMJudgeReward`` does the same with any server
that speaks the OpenAI chat-completions protocol (vLLM, SGLang, TGI, ... serving UnifiedReward,
Qwen-VL and the like): one request per image, at most ``concurrency`` in flight, each

    POST {url}/chat/completions
    {"model": MODEL, "temperature": 0, "max_tokens": N,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": TEMPLATE with {caption} replaced by the prompt}]}]}

and the score is the first number a pattern finds in ``choices[0].message.content``.

Failures follow the ``remote`` reward (``remote.py``): a server it cannot reach (connection refused
or reset, HTTP 502/503/504) is retried with exponential backoff for ``patience`` seconds, then
``RewardUnavailable`` stops the run with a checkpoint; an HTTP 500, a read timeout or a reply that is
not a chat completion is retried ``retries`` times, then that image scores NaN. An answer without a
readable score, or with one outside ``score_range``, scores NaN at once (at temperature 0 asking
again gives the same answer). NaN is masked out of the advantages, never a silent 0 (flow_grpo
scores an unparsed answer 0). A call in which no image scored raises with the first cause.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import Reward, RewardUnavailable
from mixgrpo.plugins.rewards.preprocess import check_batch, to_uint8_levels
from mixgrpo.plugins.rewards.remote import with_retries

#: The default question (written for mixgrpo; bind ``VLMJudgeReward.template`` to a recipe's own).
DEFAULT_TEMPLATE = (
    "You are shown an image generated from the caption below. Judge it on two things: (1) how faithfully "
    "it depicts the caption (the objects, their number, attributes and relations) and (2) its visual "
    "quality (clarity, detail, colour and overall appeal). Answer with one score from 1 to 5, decimals "
    "allowed, on the last line, written as 'Final Score: <score>'.\nCaption: {caption}"
)
#: Tried in order: ``Final Score: 4.5`` (UnifiedReward's answer form, optionally in Markdown bold),
#: then an answer that is a bare number.
DEFAULT_PATTERNS = (r"final score\s*:?\s*\**\s*([-+]?\d+(?:\.\d+)?)", r"\A\s*([-+]?\d+(?:\.\d+)?)\s*\.?\s*\Z")
NORMALIZE = ("max", "range", "none")


def data_url(levels: torch.Tensor, size: int | None = None) -> str:
    """One image of 8-bit levels ``[3, H, W]`` → a base64 PNG data URL, resized by PIL's bicubic to
    ``size × size`` first when ``size`` is given (flow_grpo sends 512 × 512)."""
    from PIL import Image

    image = Image.fromarray(levels.to(torch.uint8).permute(1, 2, 0).cpu().numpy(), mode="RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def compile_patterns(pattern: str | None) -> tuple[re.Pattern, ...]:
    """The user's regex (its first group, or the whole match, is the number) or the defaults."""
    if pattern is None:
        return tuple(re.compile(p, re.IGNORECASE) for p in DEFAULT_PATTERNS)
    try:
        return (re.compile(pattern),)
    except re.error as exc:
        raise ValueError(f"VLMJudgeReward.pattern = {pattern!r} is not a regular expression: {exc}") from None


def parse_score(text: str, patterns: Sequence[re.Pattern]) -> float | None:
    """The first finite number a pattern finds in ``text`` (its first group, else the whole match)."""
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            try:
                value = float(match.group(1) if pattern.groups else match.group(0))
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                return value
    return None


class Outcome:
    """One image's result: a score, or the reason it has none (``kind``: 'answer' for an answer
    without a usable score, 'request' for a request that failed)."""

    __slots__ = ("score", "kind", "reason")

    def __init__(self, score: float = math.nan, kind: str = "", reason: str = "") -> None:
        self.score, self.kind, self.reason = score, kind, reason


class VLMJudgeReward(Reward):
    """A VLM's rating of each image against its prompt, through an OpenAI-compatible server.

    Args:
        url: the server's API root, e.g. ``http://judgehost:8000/v1`` (``/chat/completions`` is added).
        model: the served model's name, as the server lists it (``GET /v1/models``).
        template: the question; ``{caption}`` is replaced by the prompt.
        pattern: a regular expression whose first group is the score; default: ``Final Score: x``,
            else an answer that is a bare number.
        score_range: ``(low, high)`` of the scale the template asks for; a score outside is masked.
        normalize: ``"max"``: score / high (flow_grpo: Final Score / 5); ``"range"``: (score − low) /
            (high − low), in [0, 1]; ``"none"``: the score as read.
        image_size: send images resized to this square (flow_grpo: 512), or as they are (None).
        temperature, max_tokens: sampling settings of the request.
        api_key: sent as ``Authorization: Bearer ...`` when set.
        concurrency: requests in flight at once.
        timeout, patience, retries, backoff, max_backoff: as ``RemoteReward`` (per request).
    """

    name = "vlm_judge"

    def __init__(self, url: str | None = None, model: str | None = None, template: str = DEFAULT_TEMPLATE,
                 pattern: str | None = None, score_range: tuple[float, float] = (1.0, 5.0), normalize: str = "max",
                 image_size: int | None = None, temperature: float = 0.0, max_tokens: int = 512,
                 api_key: str | None = None, concurrency: int = 8, timeout: float = 120.0, patience: float = 600.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        from mixgrpo.plugins.rewards.models import require_set

        require_set(url, "VLMJudgeReward.url")
        require_set(model, "VLMJudgeReward.model")
        self.endpoint = _endpoint(url)
        if not model:
            raise ValueError("VLMJudgeReward.model is not set: bind the served model's name "
                             "(gin: VLMJudgeReward.model = 'UnifiedReward-7b-v1.5'; GET /v1/models lists it)")
        if "{caption}" not in template:
            raise ValueError("VLMJudgeReward.template has no {caption} placeholder: the prompt would never reach "
                             "the judge")
        _check_numbers(score_range, normalize, image_size, max_tokens, concurrency, timeout, patience, retries,
                       backoff, max_backoff)
        self.model, self.template, self.patterns = str(model), template, compile_patterns(pattern)
        self.low, self.high = float(score_range[0]), float(score_range[1])
        self.normalize, self.image_size = normalize, image_size
        self.temperature, self.max_tokens, self.concurrency = float(temperature), int(max_tokens), int(concurrency)
        self.timeout, self.patience, self.retries = float(timeout), float(patience), int(retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()  # one requests.Session per worker thread
        self.version = f"{self.model}"

    # -- one request ------------------------------------------------------------------------------

    def _session(self):
        import requests

        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def body(self, image_url: str, prompt: str) -> dict:
        """The chat-completions request for one image and its prompt."""
        question = self.template.replace("{caption}", prompt)
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def ask(self, body: dict) -> Outcome:
        """One image's outcome, with ``remote``'s retry rules (``remote.with_retries``);
        ``RewardUnavailable`` when the server could not be reached for ``patience`` seconds."""
        outcome, attempts, error = with_retries(
            lambda: self._session().post(self.endpoint, json=body, headers=self.headers, timeout=self.timeout),
            lambda reply: self._read(_content(reply.json())), patience=self.patience, retries=self.retries,
            backoff=self.backoff, max_backoff=self.max_backoff,
            unavailable=lambda down, tries, err: (
                f"the VLM judge {self.endpoint} ({self.model}) could not be reached for {down:.0f} s ({tries} "
                f"attempts; VLMJudgeReward.patience = {self.patience:g} s): {err}"))
        if outcome is None:
            return Outcome(kind="request", reason=f"after {attempts} attempt(s): {error}")
        return outcome

    def _read(self, text: str) -> Outcome:
        """The normalised score of an answer, or why it has none."""
        score = parse_score(text, self.patterns)
        if score is None:
            return Outcome(kind="answer", reason=f"no score in the answer {text[:200]!r}")
        if not self.low <= score <= self.high:
            return Outcome(kind="answer", reason=f"score {score:g} outside score_range [{self.low:g}, {self.high:g}]")
        if self.normalize == "max":
            score = score / self.high
        elif self.normalize == "range":
            score = (score - self.low) / (self.high - self.low)
        return Outcome(score)

    # -- a batch --------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → ``[B]`` float32 scores, NaN where none was read."""
        prompts = check_batch(images, prompts, type(self).__name__)
        levels = to_uint8_levels(images).cpu()
        bodies = [self.body(data_url(img, self.image_size), p) for img, p in zip(levels, prompts)]
        if not bodies:
            return torch.zeros(0, device=images.device)
        with ThreadPoolExecutor(min(self.concurrency, len(bodies)), thread_name_prefix="mixgrpo-vlm") as pool:
            futures = [pool.submit(self.ask, b) for b in bodies]
            try:
                outcomes = [f.result() for f in futures]
            except RewardUnavailable:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return self._collect(outcomes).to(images.device)

    def _collect(self, outcomes: list[Outcome]) -> torch.Tensor:
        """Scores of the outcomes; a warning naming the first cause of each kind of failure."""
        scores = torch.tensor([o.score for o in outcomes], dtype=torch.float32)
        failed = [o for o in outcomes if o.kind]
        if not failed:
            return scores
        causes = {}
        for o in failed:
            causes.setdefault(o.kind, o.reason)
        label = {"answer": "unreadable answer(s)", "request": "failed request(s)"}
        told = "; ".join(f"{sum(o.kind == k for o in failed)} {label[k]}, first: {why}" for k, why in causes.items())
        if len(failed) == len(outcomes):
            raise RuntimeError(f"the VLM judge {self.endpoint} scored none of {len(outcomes)} images: {told}")
        warnings.warn(f"VLM judge {self.model}@{self.endpoint}: {len(failed)} of {len(outcomes)} images score NaN "
                      f"and are masked out ({told})", RuntimeWarning, stacklevel=3)
        return scores


def _endpoint(url: str | None) -> str:
    if not url:
        raise ValueError("VLMJudgeReward.url is not set: bind the OpenAI-compatible server's API root "
                         "(gin: VLMJudgeReward.url = 'http://host:8000/v1', as vLLM or SGLang serve it)")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"VLMJudgeReward.url = {url!r} must start with http:// or https://")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def _check_numbers(score_range, normalize, image_size, max_tokens, concurrency, timeout, patience, retries, backoff,
                   max_backoff) -> None:
    if len(score_range) != 2 or not float(score_range[0]) < float(score_range[1]):
        raise ValueError(f"VLMJudgeReward.score_range must be (low, high) with low < high, got {score_range!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"VLMJudgeReward.normalize must be one of {NORMALIZE}, got {normalize!r}")
    if normalize == "max" and float(score_range[1]) <= 0:
        raise ValueError(f"VLMJudgeReward.normalize = 'max' divides by score_range's high end, got {score_range!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"VLMJudgeReward.image_size must be None or an integer >= 1, got {image_size!r}")
    if timeout <= 0 or patience < 0 or retries < 0 or backoff < 0 or max_backoff < 0 or concurrency < 1 \
            or max_tokens < 1:
        raise ValueError(f"VLMJudgeReward: need timeout > 0, patience >= 0, retries >= 0, backoff >= 0, "
                         f"max_backoff >= 0, concurrency >= 1 and max_tokens >= 1 (got timeout={timeout}, "
                         f"patience={patience}, retries={retries}, backoff={backoff}, max_backoff={max_backoff}, "
                         f"concurrency={concurrency}, max_tokens={max_tokens})")


def _content(body) -> str:
    """``choices[0].message.content`` of a chat completion (text, or a list of text parts)."""
    content = body["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers answer in content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content


@hookimpl
def register_rewards(register):
    register("vlm_judge", VLMJudgeReward)
