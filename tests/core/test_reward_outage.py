"""A reward server that goes down for longer than the reward's patience loses nothing: the run stops
with a checkpoint of its last completed iteration and names the connection error, and `--resume`
once a server is back ends with the weights of a run that never saw the outage."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.commands.cli import main
from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.plugins import get_plugin_manager
from mixgrpo.core.records import read_rows
from mixgrpo.plugins.rewards.remote import RunningServer, make_app

from .conftest import ROOT

SMOKE = str(ROOT / "experiments" / "runs" / "toy_smoke.gin")


def _server() -> RunningServer:
    reward = get_plugin_manager().create("reward", "shapes.preference")
    return RunningServer(make_app(reward, "shapes.preference"), host="127.0.0.1", port=0)


def _train(out, url, *extra):
    args = ["train", SMOKE, "--output", str(out), "--gin", "TrainConfig.iterations = 4",
            "--gin", "TrainConfig.rewards = {'remote': 1.0}", "--gin", f"RemoteReward.url = '{url}'",
            "--gin", "RemoteReward.reward = 'shapes.preference'", "--gin", "RemoteReward.patience = 1.0",
            "--gin", "RemoteReward.backoff = 0.1", "--gin", "TrainConfig.progress = False", *extra]
    return main(args)


class _StopServerAfter:
    """A plugin that stops the reward server at the end of an iteration (the outage)."""

    def __init__(self, server: RunningServer, iteration: int) -> None:
        self.server, self.iteration = server, iteration

    @hookimpl
    def on_iteration_end(self, trainer, iteration, metrics):
        if iteration == self.iteration:
            self.server.stop()


def _weights(run, iteration):
    return load_file(str(run / "checkpoints" / f"iter_{iteration:06d}" / "model.safetensors"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_outage_longer_than_the_patience_checkpoints_names_the_cause_and_resumes_exactly(tmp_path, capsys):
    server = _server()
    try:
        assert _train(tmp_path / "straight", server.url) == 0  # the server never goes down
    finally:
        server.stop()

    server = _server()
    stopper = _StopServerAfter(server, 2)
    pm = get_plugin_manager()
    pm.pm.register(stopper, name="outage")
    try:
        capsys.readouterr()
        status = _train(tmp_path / "run", server.url)
    finally:
        pm.pm.unregister(stopper)
        server.stop()
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert status == 1
    assert "could not be reached" in err and "ConnectionError" in err  # the cause, not only "scored NaN"
    assert "RemoteReward.patience = 1 s" in err
    assert f"iterations up to 2 are checkpointed in {run / 'checkpoints' / 'iter_000002'}" in err
    assert f"continue with: mixgrpo train {run} --resume" in err
    assert (run / "checkpoints" / "latest").read_text() == "iter_000002"
    assert "Traceback" not in err

    server = _server()  # back, on another port: the URL is a setting a resume may change
    try:
        assert main(["train", str(run), "--resume", "--gin", f"RemoteReward.url = '{server.url}'"]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert re.search(r"RemoteReward\.url: '[^']+' -> '" + re.escape(server.url) + "'", out)
    assert [r["iteration"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]  # each once
    a, b = _weights(tmp_path / "straight", 4), _weights(run, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_reward_failing_every_iteration_stops_with_its_own_error_and_a_checkpoint(tmp_path, capsys):
    """The other way a reward stops a run: it answers, but fails, max_failed_iterations times in a
    row; the server's own error (HTTP 500 and its text) is the cause printed, and the iterations
    that trained are checkpointed."""
    from mixgrpo.core.interfaces import Reward

    class FailsFromCall(Reward):
        name = "shapes.preference"

        def __init__(self) -> None:
            self.calls, self.inner = 0, get_plugin_manager().create("reward", "shapes.preference")

        def __call__(self, images, prompts):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("CUDA out of memory in the reward model")
            return self.inner(images, prompts)

    server = RunningServer(make_app(FailsFromCall(), "shapes.preference"), host="127.0.0.1", port=0)
    try:
        status = _train(tmp_path / "run", server.url, "--gin", "RemoteReward.retries = 0",
                        "--gin", "TrainConfig.max_failed_iterations = 2")
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert status == 1
    assert "scored no sample in 2 consecutive iterations" in err
    assert "HTTP 500" in err and "CUDA out of memory in the reward model" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "iter_000001"
