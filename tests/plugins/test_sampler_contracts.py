"""Every built-in sampler passes the generic ``SamplerContract`` (mixgrpo.testing.samplers)."""

from __future__ import annotations

from mixgrpo.plugins.samplers.dpm_solver import DPMSolverPP
from mixgrpo.plugins.samplers.euler import Euler
from mixgrpo.plugins.samplers.sde import CPSSDE, DanceSDE, FlowSDE
from mixgrpo.testing import SamplerContract


class TestEulerContract(SamplerContract):
    def make_sampler(self):
        return Euler()


class TestDPMSolverPP2MContract(SamplerContract):
    def make_sampler(self):
        return DPMSolverPP(order=2)


class TestDPMSolverPP1Contract(SamplerContract):
    def make_sampler(self):
        return DPMSolverPP(order=1)


class TestFlowSDEContract(SamplerContract):
    def make_sampler(self):
        return FlowSDE(noise_level=0.7)


class TestFlowSDESumContract(SamplerContract):
    def make_sampler(self):
        return FlowSDE(noise_level=0.9, reduction="sum")


class TestDanceSDEContract(SamplerContract):
    def make_sampler(self):
        return DanceSDE(noise_level=0.3)


class TestCPSSDEContract(SamplerContract):
    def make_sampler(self):
        return CPSSDE(noise_level=0.8)
