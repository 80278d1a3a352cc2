"""Discrete-event simulation of a plan serving a request stream (same cost model as the planner)."""

from planner.sim.cluster import Routing, SimResult, simulate
from planner.sim.kernel import EventQueue

__all__ = ["EventQueue", "Routing", "SimResult", "simulate"]
