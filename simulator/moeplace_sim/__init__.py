"""Discrete-event simulator of expert-parallel MoE serving on top of ``placement``: what a
placement, a dispatch rule and a re-placement policy do to TTFT, TPOT and SLO attainment.
Never imports the operator: it replays the operator's rollout rules from ``placement.policy``."""
