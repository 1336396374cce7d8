"""Exercise 2: the rare-token identifier (section 3.2): handout.md, starter.py, grader.py."""
