"""Staged rollouts (docs/rollouts.md): the gate grammar and the figures it reads, the wave planner (pure), the
persisted rollout state and the controller loop."""
