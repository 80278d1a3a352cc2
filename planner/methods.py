"""Names of the planning methods (kept apart so importing it needs no deap)."""

METHODS: tuple[str, ...] = ("e2llm", "splitwise", "pipeline", "memprop", "homogeneous")
"""e2llm (search + DP + role search) and the baselines documented in `planner.baselines`."""
