"""Exercise identifier: the rare-token identifier [V] (DreamBooth, section 3.2).

Write the four bodies, then grade them:

    python -m assignments.grade identifier --file assignments/identifier/starter.py

The tokenizer is clip_text.CLIPTokenizer. What you need of it:
    tokenizer.merges             the BPE merges [(a, b), ...] in the order learned; merges[r] has rank r
    tokenizer.vocab              {token string: id}; a token that ends a word ends in "</w>"
    tokenizer.merge_rank(token)  the rank of the merge that made `token`, None when no merge made it
    tokenizer.encode(text)       [start id, token ids..., end id]
"""
import random  # noqa: F401  (choose_identifier draws with random.Random(seed))

RARE_FRACTION = 0.2  # rare = among the last fifth of the merges


def rare_merge_ranks(tokenizer, fraction=RARE_FRACTION):
    """(lowest, highest) merge rank of the last `fraction` of the tokenizer's merges: with n
    merges, from int(n * (1 - fraction)) to n - 1, both included."""
    raise NotImplementedError


def rare_token_candidates(tokenizer, merge_ranks=None, max_letters=3):
    """The words a rare identifier can be: vocabulary tokens that are a whole word (end in
    "</w>"), of 1..max_letters ASCII letters, whose merge rank lies in merge_ranks (low, high),
    both included (default: rare_merge_ranks(tokenizer)). Returns the words without "</w>",
    sorted by merge rank, rarest (highest rank) last."""
    raise NotImplementedError


def choose_identifier(tokenizer, class_noun, *, seed=0, num_tokens=1, merge_ranks=None):
    """Draw `num_tokens` different candidates (never a word of the class noun) with
    random.Random(seed), so that a seed always gives the same identifier, and join them with
    spaces. Raise ValueError when there are fewer candidates than num_tokens. The identifier
    must pass check_identifier before it is returned."""
    raise NotImplementedError


def check_identifier(tokenizer, identifier, class_noun, template="a photo of {identifier} {class_noun}"):
    """The identifier must reach the model as its own tokens. Tokenize the identifier, the class
    noun and the prompt (template filled in), each without the start and end ids. Raise
    ValueError when the identifier has no tokens, or its tokens are all the class noun's, or the
    prompt does not contain the identifier's tokens followed directly by the class noun's.
    Returns the identifier's token ids (a list of ints)."""
    raise NotImplementedError
