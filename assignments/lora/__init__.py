"""Exercise 6: a LoRA layer: handout.md, starter.py, grader.py."""
