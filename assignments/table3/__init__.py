"""Exercise 7: the prior-preservation ablation (Table 3) on the toy model: handout.md, starter.py, run.py, grader.py."""
