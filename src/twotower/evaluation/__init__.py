"""Evaluation: exact AR scoring with the frozen context tower, and an lm-evaluation-harness adapter.

`scoring` needs only torch. `harness` needs the optional `lm_eval` package (`pip install 'twotower[eval]'`)
and is imported only where it is used.
"""
