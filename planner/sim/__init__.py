"""Discrete-event simulation of a plan serving a request stream (same cost model and the
same routing code as the runtime)."""

from planner.sim.cluster import SimResult, SimulationError, simulate
from planner.sim.kernel import EventQueue

__all__ = ["EventQueue", "SimResult", "SimulationError", "simulate"]
