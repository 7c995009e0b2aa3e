"""The demonstrations, in one place above the library: `thoughtscope demo` (workflow.run_demo) and the stages
and scripts it shares with the other areas.

- workflow.py: `run_demo`, the main workflow on the embedded default model (harvest, SAE, atlas, steer, NLA, probes)
- atlas.py: `demo_feature_cards`, a small atlas with random and searched feature cards
- steer.py: `concept_demo`, `suppression_demo` (scripts/steer_demo.py) and `default_demo` (the steering stage)
- probes.py: `probe_demo`, a quick layer sweep (`thoughtscope probe demo`)
"""

from __future__ import annotations

from .workflow import _nla_stage, run_demo  # noqa: F401  (_nla_stage: tests call that stage alone)

__all__ = ["run_demo"]
