"""Exercise 1: the prior-preservation loss (Eq. 2): handout.md, starter.py, grader.py."""
