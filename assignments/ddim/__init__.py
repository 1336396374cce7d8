"""Exercise 3: the forward process, the v-target and one DDIM step: handout.md, starter.py, grader.py."""
