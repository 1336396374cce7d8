"""A byte-level BPE trainer that writes a CLIP tokenizer folder in the Hub's format.

CLIP's vocabulary was learned by byte-pair encoding (Sennrich et al., 2016) on its captions:
start from single byte symbols (a word's last symbol marked "</w>"), count every adjacent pair
over the corpus, merge the most frequent pair into a new symbol, and repeat. The merges, in the
order learned, ARE the tokenizer: clip_text.CLIPTokenizer replays them by rank. This file learns
a tiny vocabulary the same way from the toy world's captions and writes the four files of a Hub
`tokenizer/` folder (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json),
which our CLIPTokenizer.from_folder and transformers' CLIPTokenizer both read.

Rare identifiers (DreamBooth section 3.2). A large vocabulary is full of tokens that its BPE
corpus contained but the model's captions almost never did: their merges were learned last
(few occurrences) and their embeddings carry little meaning. We recreate that: a few short
made-up words (RARE_WORDS) are added once each to the BPE corpus but never appear in a caption,
so their merges are the last ones and their embeddings are never trained.

Vocabulary layout (as CLIP's): the 256 byte symbols, the same 256 with "</w>", one token per
merge in rank order, then <|startoftext|> and <|endoftext|>.
"""
from collections import Counter

from clip_text import (BYTE_TO_UNICODE, END_OF_WORD, END_TOKEN, START_TOKEN, CLIPTokenizer, clean_text, merge_pair,
                       pre_tokenize)

# Short made-up words for identifiers: never in a caption, not an English word of the captions.
# ("dax" and "wug" are linguists' classic nonce words.)
RARE_WORDS = ("dax", "wug", "zib", "vep", "kiv", "quo", "jex", "fep", "tup", "nux", "yat", "mok",
              "rav", "hoj", "gib", "sut", "zor", "bly", "kel", "pem", "vox", "wix", "zuk", "jom")


def word_counts(texts):
    """Counts of the pre-tokenized pieces of `texts`, written in the byte alphabet, as CLIP's
    tokenizer splits them (clean-up, lowercase, words / digits / punctuation)."""
    counts = Counter()
    for text in texts:
        for piece in pre_tokenize(clean_text(text)):
            counts["".join(BYTE_TO_UNICODE[b] for b in piece.encode("utf-8"))] += 1
    return counts


def learn_merges(counts, max_merges=None):
    """The BPE merges of a word-count table, most frequent pair first; ties go to the pair that
    sorts first, so the result is deterministic. Stops when every word is one symbol (or after
    max_merges)."""
    words = Counter()
    for word, n in counts.items():
        words[(*word[:-1], word[-1] + END_OF_WORD)] += n
    merges = []
    while max_merges is None or len(merges) < max_merges:
        pairs = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for symbols, n in words.items():
            merged[tuple(merge_pair(symbols, best)) if best[0] in symbols else symbols] += n
        words = merged
    return merges


def build_vocab(merges):
    """token -> id in CLIP's layout."""
    alphabet = list(BYTE_TO_UNICODE.values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise ValueError("BPE produced a token twice; the merges are inconsistent")
    return {t: i for i, t in enumerate(tokens)}


def train_tokenizer(texts, rare_words=RARE_WORDS, max_length=77):
    """A CLIPTokenizer whose BPE is learned on `texts` plus each rare word once, padding to
    max_length tokens. Save it with .save(folder)."""
    counts = word_counts(texts)
    seen = [w for w in rare_words if w in counts]
    if seen:
        raise ValueError(f"rare words {seen} occur in the texts: they would not be rare")
    counts.update(word_counts(rare_words))
    merges = learn_merges(counts)
    return CLIPTokenizer(build_vocab(merges), merges, max_length=max_length)


def rare_merge_ranks(tokenizer, rare_words=RARE_WORDS):
    """(first, last) merge rank of the rare words' whole-word tokens: the range to draw an
    identifier from with dreambooth.choose_identifier(..., merge_ranks=...)."""
    ranks = [tokenizer.merge_rank(w + END_OF_WORD) for w in rare_words]
    ranks = [r for r in ranks if r is not None]
    return min(ranks), max(ranks)
