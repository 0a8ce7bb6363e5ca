"""Tools beside the front-ends: the judge and `gen eval` (judge.py, eval.py), `gen bench` (bench.py)."""
