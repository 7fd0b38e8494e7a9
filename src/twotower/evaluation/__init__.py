"""Evaluation: exact AR scoring with the frozen context tower, and an lm-evaluation-harness adapter.

`scoring` needs only torch. `harness` needs the optional `lm_eval` package (`pip install 'twotower[eval]'`)
and is imported only where it is used.

The paper's table (`twotower eval --paper`): `paper` (the rows: plain data), `extra_tasks` (task
YAMLs the harness lacks), `paper_run` (runs every row in every column), `paper_report` (the table and
its arithmetic), `paper_plot` (the figure).
"""
