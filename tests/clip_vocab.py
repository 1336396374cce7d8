"""Test helper: the real CLIP vocabulary as a Hub-layout `tokenizer/` folder, and the original
CLIP tokenizer as a reference.

Both come from the open_clip_torch wheel (installed with --no-deps), which ships the original
BPE file (bpe_simple_vocab_16e6.txt.gz) and the original tokenizer source (open_clip/tokenizer.py,
copied from openai/CLIP). The package itself is never imported: its files are found with
importlib.util.find_spec, which locates a package without running it.

    from clip_vocab import write_hub_tokenizer
    folder = write_hub_tokenizer(tmp_path / "tokenizer")            # SD1: pads with <|endoftext|>
    folder = write_hub_tokenizer(tmp_path / "tokenizer", pad="!")   # SD2: pads with "!" (id 0)
"""
import functools
import gzip
import importlib.util
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP's 49408 tokens = 512 byte tokens + 48894 merges + 2 special


def open_clip_file(name):
    """Path of a file shipped inside the open_clip package folder."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise RuntimeError("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / name


@functools.lru_cache(maxsize=1)
def clip_merges():
    """The 48894 merges of CLIP's BPE as 'a b' lines, in rank order (line 0 is a version header)."""
    lines = gzip.open(open_clip_file("bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    return tuple(lines[1:NUM_MERGES + 1])


def _byte_alphabet():
    """GPT-2/CLIP bytes_to_unicode() values in its order (written here independently)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


@functools.lru_cache(maxsize=1)
def clip_vocab():
    """token -> id exactly as the Hub's openai/clip-vit-large-patch14 vocab.json: 256 byte
    symbols, the same with '</w>', one token per merge, '<|startoftext|>', '<|endoftext|>'."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(line.split()) for line in clip_merges()]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return vocab


def _added_token(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def write_hub_tokenizer(folder, pad="<|endoftext|>"):
    """Write vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json as the SD1
    (pad '<|endoftext|>') or SD2 (pad '!') Hub tokenizer folders have them. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(clip_merges()) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": _added_token("<|startoftext|>", True),
               "eos_token": _added_token("<|endoftext|>", True),
               "pad_token": pad,
               "unk_token": _added_token("<|endoftext|>", True)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
              **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v)
                 for k, v in special.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@functools.lru_cache(maxsize=1)
def original_tokenizer_module():
    """open_clip/tokenizer.py (the original CLIP tokenizer) loaded by file path. It has no
    relative imports; it needs ftfy, regex, numpy and torch, and builds its SimpleTokenizer
    from the .gz beside it on import."""
    path = open_clip_file("tokenizer.py")
    spec = importlib.util.spec_from_file_location("original_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def original_tokenizer():
    """The original CLIP tokenizer as openai/CLIP's simple_tokenizer.py has it: open_clip's
    SimpleTokenizer, whose only difference is the names of its two special tokens
    (<start_of_text>, <end_of_text>), with OpenAI's names (the Hub's) put back: in the vocabulary,
    the BPE cache and the split pattern. Call it on a list of prompts for [B, 77] ids padded
    with 0, or .encode(text) for the ids between the start and end tokens (untruncated)."""
    module = original_tokenizer_module()
    tokenizer = module.SimpleTokenizer()
    for old, new in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        tokenizer.encoder[new] = tokenizer.encoder.pop(old)
        tokenizer.decoder[tokenizer.encoder[new]] = new
        del tokenizer.cache[old]
        tokenizer.cache[new] = new
    tokenizer.pat = module.re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        module.re.IGNORECASE)
    return tokenizer
