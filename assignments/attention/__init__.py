"""Exercise 4: cross-attention in the UNet's transformer block: handout.md, starter.py, grader.py."""
