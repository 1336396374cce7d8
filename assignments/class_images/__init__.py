"""Exercise 5: the autogenous class images (section 3.3): handout.md, starter.py, grader.py."""
