"""Grader of the identifier exercise: the student's rare-token functions against dreambooth.py's,
on the toy model's tokenizer (108 merges) and on a 30-merge tokenizer built here whose last
merges are the edge cases: a token at each end of the rare range, one just below it, a piece
that does not end a word, a digit, four letters, and letters that are not ASCII."""
from functools import lru_cache
from types import SimpleNamespace

import dreambooth
from assignments.checking import Check, Fail, expect, load_file, source_notes
from clip_text import BYTE_TO_UNICODE, END_OF_WORD, END_TOKEN, START_TOKEN, CLIPTokenizer
from load_weights import TOY_MODEL

FUNCTIONS = ("rare_merge_ranks", "rare_token_candidates", "choose_identifier", "check_identifier")
MINUTES = "about 45 min to write; grading takes under 1 s"
NOT_ASCII = "".join(BYTE_TO_UNICODE[b] for b in "à".encode())  # two byte symbols, both letters (isalpha)

# The edge-case tokenizer: ranks 0-22 make common words, 23-29 the cases above (rare range: 24-29).
EDGE_MERGES = [("t", "h"), ("th", "e</w>"), ("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>"),
               ("p", "h"), ("o", "t"), ("ot", "o</w>"), ("ph", "oto</w>"), ("o", "f</w>"), ("r", "e"),
               ("re", "d</w>"), ("s", "t"), ("a", "r</w>"), ("st", "ar</w>"), ("b", "i"), ("bi", "g</w>"),
               ("u", "n</w>"), ("s", "un</w>"), ("m", "o"), ("o", "n</w>"), ("mo", "on</w>"),
               ("w", "u</w>"),               # 23: just below the range
               ("q", "x</w>"),               # 24: the range's low end
               ("z", "v"),                   # 25: not a whole word
               ("k", "1</w>"),               # 26: a digit
               ("zv", "q</w>"),              # 27: three letters
               ("zv", "qx</w>"),             # 28: four letters
               (NOT_ASCII[0], NOT_ASCII[1] + END_OF_WORD)]  # 29: the range's high end, not ASCII


def load(path):
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(**{name: getattr(dreambooth, name) for name in FUNCTIONS})


def notes(path):
    return source_notes(path, {f"dreambooth.{name}": f"your file calls the project's own {name}: write it yourself"
                               for name in FUNCTIONS})


@lru_cache(maxsize=None)
def toy_tokenizer():
    return CLIPTokenizer.from_folder(TOY_MODEL / "tokenizer")


@lru_cache(maxsize=None)
def edge_tokenizer():
    symbols = list(BYTE_TO_UNICODE.values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in EDGE_MERGES] + [START_TOKEN, END_TOKEN]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, EDGE_MERGES)


def why_not(tokenizer, word, merge_ranks, max_letters):
    """Why `word` is (or is not) a candidate: the rule it breaks, for hints."""
    token = word if word.endswith(END_OF_WORD) else word + END_OF_WORD
    rank, bare = tokenizer.merge_rank(token), token.removesuffix(END_OF_WORD)
    if token not in tokenizer.vocab:
        return f"'{word}' is not a whole-word token (no '{bare}</w>' in the vocabulary)"
    if rank is None:
        return f"'{bare}' has no merge rank (a single byte symbol): it can never be a candidate"
    if not (bare.isascii() and bare.isalpha()):
        return f"'{bare}' is not all ASCII letters"
    if len(bare) > max_letters:
        return f"'{bare}' has {len(bare)} letters (max_letters={max_letters})"
    low, high = merge_ranks
    if not low <= rank <= high:
        return f"'{bare}' has merge rank {rank}, outside the range ({low}, {high})"
    return f"'{bare}' (merge rank {rank}) is a whole word of letters inside the range ({low}, {high}), both ends included"


def check_ranks(student, fraction=None):
    for tokenizer in (toy_tokenizer(), edge_tokenizer()):
        args = () if fraction is None else (fraction,)
        got, expected = student.rare_merge_ranks(tokenizer, *args), dreambooth.rare_merge_ranks(tokenizer, *args)
        n = len(tokenizer.merges)
        if tuple(got) == tuple(expected):
            continue
        hint = f"rare_merge_ranks for {n} merges{f' and fraction={fraction}' if args else ''}: expected {expected}, got {tuple(got)}"
        if got[0] == 0:
            hint += ": it starts at the first merge, but merges are learned most frequent first, so rare tokens are the LAST ones"
        elif got[1] == n:
            hint += f": ranks run from 0 to {n - 1}"
        raise Fail(hint)


def check_candidates(student, tokenizer, merge_ranks=None, max_letters=3, label="edge-case tokenizer"):
    kwargs = dict(merge_ranks=merge_ranks, max_letters=max_letters)
    got = list(student.rare_token_candidates(tokenizer, **kwargs))
    expected = dreambooth.rare_token_candidates(tokenizer, **kwargs)
    if got == expected:
        return
    ranks = merge_ranks or dreambooth.rare_merge_ranks(tokenizer)
    setting = f"{label}, merge_ranks={ranks}, max_letters={max_letters}"
    extra = [w for w in got if w not in expected]
    missing = [w for w in expected if w not in got]
    if extra:
        raise Fail(f"{setting}: {why_not(tokenizer, extra[0], ranks, max_letters)}, but it is in your list")
    if missing:
        raise Fail(f"{setting}: {why_not(tokenizer, missing[0], ranks, max_letters)}, but your list leaves it out")
    raise Fail(f"{setting}: the right words in the wrong order: expected {expected[:6]}..., got {got[:6]}...: "
               "sort by merge rank, rarest (highest rank) last" if len(got) == len(expected) else
               f"{setting}: {len(got)} words, expected {len(expected)} (a word listed twice?)")


def check_candidate_settings(student):
    edge = edge_tokenizer()
    check_candidates(student, edge, merge_ranks=(0, len(edge.merges) - 1))
    check_candidates(student, edge, max_letters=4)
    check_candidates(student, toy_tokenizer(), label="toy tokenizer")


def check_choose(student):
    tokenizer, pool = toy_tokenizer(), dreambooth.rare_token_candidates(toy_tokenizer())
    drawn = [student.choose_identifier(tokenizer, "circle", seed=s) for s in range(20)]
    for seed, word in enumerate(drawn):
        expect(isinstance(word, str), f"seed {seed}: expected a string, got {type(word).__name__}")
        expect(word in pool, f"seed {seed} gave {word!r}, which is not a rare candidate of the toy tokenizer")
    again = student.choose_identifier(tokenizer, "circle", seed=7)
    expect(again == drawn[7], f"seed 7 gave {drawn[7]!r}, then {again!r}: draw with random.Random(seed)")
    expect(len(set(drawn)) >= 5, f"seeds 0-19 gave only {sorted(set(drawn))}: draw with random.Random(seed)")


def check_choose_edges(student):
    edge = edge_tokenizer()
    for seed in range(10):  # the candidates are qx and zvq: with class noun "qx", only zvq is left
        word = student.choose_identifier(edge, "qx", seed=seed)
        expect(word != "qx", f"class noun 'qx', seed {seed}: got 'qx'; the identifier is never a word of the class noun")
        expect(word == "zvq", f"class noun 'qx', seed {seed}: got {word!r}, not a candidate: "
                              f"{why_not(edge, word, dreambooth.rare_merge_ranks(edge), 3)}")
    try:
        word = student.choose_identifier(edge, "qx", seed=0, num_tokens=2)
    except ValueError:
        pass
    else:
        raise Fail(f"2 tokens from 1 candidate: expected ValueError, got {word!r}")
    words = student.choose_identifier(toy_tokenizer(), "circle", seed=3, num_tokens=2).split(" ")
    pool = dreambooth.rare_token_candidates(toy_tokenizer())
    expect(len(words) == 2 and len(set(words)) == 2 and set(words) <= set(pool),
           f"num_tokens=2: expected two different candidates joined by a space, got {' '.join(words)!r}")


def check_ids(student):
    tokenizer = toy_tokenizer()
    for identifier in ("wug", "wug zor"):
        got = student.check_identifier(tokenizer, identifier, "circle")
        expected = dreambooth.check_identifier(tokenizer, identifier, "circle")
        expect(list(got) == expected, f"check_identifier({identifier!r}, 'circle'): expected the ids {expected}, got {got}")
    expected = dreambooth.check_identifier(tokenizer, "wug", "circle", template="{identifier} {class_noun} on the grass")
    got = student.check_identifier(tokenizer, "wug", "circle", template="{identifier} {class_noun} on the grass")
    expect(list(got) == expected, f"template '{{identifier}} {{class_noun}} on the grass': expected {expected}, got {got}")


def expect_rejected(student, identifier, class_noun, template=None, why=""):
    kwargs = {} if template is None else dict(template=template)
    try:
        got = student.check_identifier(toy_tokenizer(), identifier, class_noun, **kwargs)
    except ValueError:
        return
    raise Fail(f"check_identifier({identifier!r}, {class_noun!r}{', ' + repr(template) if template else ''}): "
               f"expected ValueError ({why}), got {got}")


def check_rejects(student):
    expect_rejected(student, "", "circle", why="no tokens")
    expect_rejected(student, "   ", "circle", why="no tokens")
    expect_rejected(student, "circle", "circle", why="the identifier is the class noun")
    expect_rejected(student, "circle circle", "circle", why="every token of the identifier is the class noun's")


def check_prompt_keeps_tokens(student):
    expect_rejected(student, "wug", "circle", "a photo of {identifier}{class_noun}",
                    why="the prompt glues them into 'wugcircle', whose tokens are neither 'wug' nor 'circle'")


def checks(student):
    edge = edge_tokenizer()
    return [Check("rare_merge_ranks: the last fifth of the merges", lambda: check_ranks(student)),
            Check("rare_merge_ranks: another fraction (0.5)", lambda: check_ranks(student, 0.5)),
            Check("rare_token_candidates: whole words of <= 3 ASCII letters in the rare range",
                  lambda: check_candidates(student, edge)),
            Check("rare_token_candidates: merge_ranks, max_letters; the toy vocabulary in rank order",
                  lambda: check_candidate_settings(student)),
            Check("choose_identifier: a seeded draw among the candidates", lambda: check_choose(student)),
            Check("choose_identifier: never the class noun, num_tokens, too few candidates",
                  lambda: check_choose_edges(student)),
            Check("check_identifier: returns the identifier's token ids", lambda: check_ids(student)),
            Check("check_identifier: rejects an empty identifier and the class noun", lambda: check_rejects(student)),
            Check("check_identifier: the prompt must keep the identifier's tokens",
                  lambda: check_prompt_keeps_tokens(student))]
