"""The prompt encoder of Stable Diffusion: the CLIP text transformer and its BPE tokenizer.

A prompt becomes the conditioning c that the UNet cross-attends to in two steps:

  1. CLIPTokenizer: text -> 77 token ids. Clean the text, split it into words, punctuation
     and digits, encode each piece as bytes and merge the bytes back into vocabulary tokens by
     byte-pair encoding (BPE, Sennrich et al., 2016), then add the start/end tokens and pad.
  2. CLIPTextModel: ids [B, 77] -> c [B, 77, D], a causal pre-LayerNorm transformer
     (Radford et al., 2021, section 2.4), D = 768 for SD1 and 1024 for SD2.

SDXL has two of them (sdxl_text_conditioning): OpenAI's CLIP ViT-L and OpenCLIP's ViT-bigG,
the second with its projection head (CLIPTextModelWithProjection), whose pooled output
conditions the UNet beside the per-token context.

The file holds, in this order: 1. the text transformer, 2. the BPE tokenizer, 3. the text
clean-up and split that the tokenizer applies before BPE.

The model's parameter names are those of the Hub's text_encoder/model.safetensors
(transformers' CLIPTextModel with its `text_model.` prefix): it loads with strict=True.

The tokenizer is written from scratch with the standard library and reproduces the ORIGINAL
CLIP tokenizer (openai/CLIP simple_tokenizer.py, copied into open_clip/tokenizer.py): its
ftfy.fix_text + html clean-up, its regex split pattern and its BPE give the same ids, but for
two deviations of the clean-up stated in section 3.

The original pads with 0; Stable Diffusion pads with the pad token of its tokenizer folder:
"<|endoftext|>" (id 49407) for SD1 and "!" (id 0) for SD2. (transformers' CLIPTokenizer, which
diffusers uses, then also splits every "!" of an SD2 prompt off as that special token, id 0;
the original, which SD2's text encoder was trained with, and this tokenizer encode it as text,
e.g. "!</w>", id 256.)
"""
import html
import html.entities
import json
import re
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"  # marks a word's last symbol: "dog</w>" (a word) differs from "dog" (in "dogma")


# ----------------------------------------------------------------------------------------------
# 1. The text transformer


@dataclass
class CLIPTextConfig:
    """The text transformer's shape, under the keys of a Hub text_encoder/config.json (defaults:
    transformers' CLIPTextConfig's). Hub configs are checked by load_weights.text_encoder_config."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # width of the pooled embedding (CLIPTextModelWithProjection only)

    @classmethod
    def from_dict(cls, d):
        """The fields among the keys of `d`; the others (_name_or_path, bos_token_id, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


PRESETS = {
    # OpenAI CLIP ViT-L/14 text tower.
    "sd15": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    # OpenCLIP ViT-H/14 text tower, stored with 23 of its 24 layers: SD2 conditions on the
    # penultimate layer's output (followed by the final LayerNorm).
    "sd21-base": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                num_attention_heads=16, hidden_act="gelu"),
    "sd21": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                           num_attention_heads=16, hidden_act="gelu"),
    # SDXL's text_encoder is SD1's ViT-L/14; text_encoder_2 the OpenCLIP ViT-bigG/14 text tower,
    # all 32 layers (the last one feeds the pooled embedding), with its projection.
    "sdxl-base": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    "sdxl-base-2": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
}


def quick_gelu(x):
    """CLIP's sigmoid approximation of GELU (used by SD1's OpenAI CLIP ViT-L/14)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu": exact (erf) GELU, SD2's OpenCLIP


class CLIPAttention(nn.Module):
    """Multi-head self-attention. Causal for text (token t sees tokens 0..t, as in a language
    model); CLIP's image tower (vision.py) reuses it with causal=False."""

    def __init__(self, config, causal=True):
        super().__init__()
        self.num_heads, self.causal = config.num_attention_heads, causal
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, D = x.shape
        # (B, T, D) -> (B, heads, T, head_dim)
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # softmax(q k^T / sqrt(d)) v
        # (B, heads, T, head_dim) -> (B, T, heads * head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config, causal=True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def embedding(num_embeddings, dim):
    """nn.Embedding with PyTorch's N(0, 1) initialisation, skipped on the meta device: there
    the loader overwrites it anyway, and nn.init on a meta tensor imports torch._dynamo, a
    one-time import of about 1 s, most of a load's time (bench/README.md)."""
    weight = torch.empty(num_embeddings, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, dim, _weight=weight)


class CLIPTextModel(nn.Module):
    """Token ids [B, T] (T <= 77) -> the text conditioning [B, T, hidden_size].

    The output is the last layer's hidden states after the final LayerNorm (transformers'
    last_hidden_state), which is what Stable Diffusion's UNet cross-attends to. Weights come
    from the Hub checkpoint; the initialisation is PyTorch's default."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        width = config.hidden_size
        # The nested containers exist to give the Hub's parameter names:
        # text_model.embeddings.token_embedding.weight, text_model.encoder.layers.0.mlp.fc1.bias, ...
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=embedding(config.vocab_size, width),
                position_embedding=embedding(config.max_position_embeddings, width),
            )),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)),
            )),
            final_layer_norm=nn.LayerNorm(width, eps=config.layer_norm_eps),
        ))

    def forward(self, input_ids):
        return self.text_model.final_layer_norm(self.hidden_states(input_ids)[-1])

    def hidden_states(self, input_ids):
        """Every layer's input and the last layer's output, all BEFORE the final LayerNorm: a list
        of num_hidden_layers + 1 tensors [B, T, D] (transformers' hidden_states). SDXL reads the
        penultimate layer's output, hidden_states(ids)[-2], as it is."""
        model = self.text_model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # learned absolute position embeddings: (B, T, D) + (T, D)
        states = [model.embeddings.token_embedding(input_ids) + model.embeddings.position_embedding(positions)]
        for layer in model.encoder.layers:
            states.append(layer(states[-1]))
        return states


class CLIPTextModelWithProjection(CLIPTextModel):
    """Token ids [B, T] -> the pooled text embedding [B, projection_dim] (transformers'
    CLIPTextModelWithProjection's text_embeds): the final-LayerNormed last layer read at the end
    token, the only position that has attended to the whole prompt under the causal mask, through
    text_projection (a Linear without bias). The end token is found as in the original CLIP, at
    the largest id: <|endoftext|> (49407) is the last id of the vocabulary, and argmax gives its
    first occurrence when it pads too. SDXL's text_encoder_2; parameter names: the Hub's."""

    def __init__(self, config):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids):
        return self.pooled(super().forward(input_ids), input_ids)

    def pooled(self, last_hidden_state, input_ids):
        """The projected end-token row of last_hidden_state [B, T, D] (after the final LayerNorm)."""
        end = input_ids.argmax(dim=-1)
        return self.text_projection(last_hidden_state[torch.arange(len(input_ids), device=input_ids.device), end])


def sdxl_text_conditioning(text_encoder, text_encoder_2, input_ids, input_ids_2):
    """SDXL's text conditioning (Podell et al., 2023, section 2.1) -> (context [B, 77, 768 + 1280],
    pooled [B, 1280]). input_ids come from tokenizer/ (padded with <|endoftext|>), input_ids_2
    from tokenizer_2/ (padded with "!"), both [B, 77].

    context, what the UNet cross-attends to: the penultimate layer's hidden states of CLIP ViT-L
    (text_encoder) and of OpenCLIP ViT-bigG (text_encoder_2), WITHOUT the final LayerNorm, side by
    side on the channels. pooled, which the UNet adds to its time embedding: text_encoder_2's
    projected end token, from its last layer after the final LayerNorm. (The pooled output of
    text_encoder is not used.)"""
    penultimate = text_encoder.hidden_states(input_ids)[-2]
    states_2 = text_encoder_2.hidden_states(input_ids_2)
    pooled = text_encoder_2.pooled(text_encoder_2.text_model.final_layer_norm(states_2[-1]), input_ids_2)
    return torch.cat([penultimate, states_2[-2]], dim=-1), pooled  # (B, 77, 768) + (B, 77, 1280)


# ----------------------------------------------------------------------------------------------
# 2. The byte-level BPE tokenizer


def _bytes_to_unicode():
    """Byte -> printable character (GPT-2's byte-level alphabet): printable Latin-1 bytes are
    themselves, the 68 others (space, controls, ...) become U+0100 onwards. Any text is then a
    string over 256 symbols, all in the vocabulary, and no token contains a space."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _read_special_token(value):
    return value["content"] if isinstance(value, dict) else value  # str or an AddedToken dict


def merge_pair(symbols, pair):
    """Merge every occurrence of the adjacent `pair` in a word's symbols, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, read from a Hub `tokenizer/` folder.

        tokenizer = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")
        ids = tokenizer(["a photo of sks dog"])   # LongTensor [1, 77]

    vocab: token string -> id. Tokens are strings over the byte alphabet (BYTE_TO_UNICODE; ASCII
    letters and punctuation are themselves), ending in "</w>" when they end a word.
    merges: the BPE merges (a, b) in the order they were learned; merges[r] has rank r.
    """

    def __init__(self, vocab, merges, pad_token=END_TOKEN, max_length=77):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.max_length = max_length
        if any(len(m) != 2 for m in self.merges):
            raise ValueError("CLIP tokenizer: every merge must be a pair of tokens "
                             "(a line 'a b' in merges.txt)")
        missing = [t for t in (START_TOKEN, END_TOKEN, pad_token) if t not in self.vocab]
        missing += [t for c in BYTE_TO_UNICODE.values() for t in (c, c + END_OF_WORD)
                    if t not in self.vocab]
        missing += ["".join(m) for m in self.merges if "".join(m) not in self.vocab]
        if missing:
            raise ValueError(f"CLIP tokenizer: {len(missing)} tokens missing from the vocabulary, "
                             f"e.g. {missing[:5]}; vocab.json and merges.txt do not belong together")
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self.start_id = self.vocab[START_TOKEN]
        self.end_id = self.vocab[END_TOKEN]
        self.pad_id = self.vocab[pad_token]
        self.pad_token = pad_token
        self._ranks = {m: r for r, m in enumerate(self.merges)}
        self._token_ranks = {"".join(m): r for r, m in enumerate(self.merges)}
        self._cache = {START_TOKEN: (START_TOKEN,), END_TOKEN: (END_TOKEN,)}

    @classmethod
    def from_folder(cls, folder):
        """Read vocab.json, merges.txt and the pad token / model_max_length of
        special_tokens_map.json and tokenizer_config.json."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} is missing: a CLIP tokenizer folder holds vocab.json, "
                    "merges.txt, special_tokens_map.json and tokenizer_config.json")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter's values win
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        # transformers writes 1e30 for "no limit"; CLIP has 77 positions
        max_length = min(settings.get("model_max_length") or 77, 77)
        pad_token = _read_special_token(settings.get("pad_token") or END_TOKEN)
        return cls(vocab, merges, pad_token, max_length)

    def save(self, folder):
        """Write the four Hub files (what transformers.CLIPTokenizer also reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
                   "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
        config = {**special, "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return folder

    # -- vocabulary access (rare-token search) --

    @property
    def vocab_size(self):
        return len(self.vocab)

    def token_to_id(self, token):
        return self.vocab[token]

    def id_to_token(self, token_id):
        return self._id_to_token[int(token_id)]

    def merge_rank(self, token_or_pair):
        """Rank of a BPE merge: 0 is the first merge learned (the most frequent pair of CLIP's
        training captions); the later a merge, the rarer its token. Given a pair (a, b): the
        rank of merging a with b. Given a token: the rank of the merge that created it (in
        CLIP's vocabulary its id is 512 + rank). None when no merge makes it (single bytes,
        special tokens)."""
        if isinstance(token_or_pair, str):
            return self._token_ranks.get(token_or_pair)
        return self._ranks.get(tuple(token_or_pair))

    # -- encoding --

    def bpe(self, word):
        """Vocabulary tokens of one pre-tokenized piece written in the byte alphabet (for ASCII
        text, the text itself): start from single symbols, the last one marked as word end,
        and repeatedly merge the adjacent pair of lowest merge rank."""
        if word not in self._cache:
            parts = [*word[:-1], word[-1] + END_OF_WORD]
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: self._ranks.get(p, float("inf")))
                if pair not in self._ranks:
                    break
                parts = merge_pair(parts, pair)
            self._cache[word] = tuple(parts)
        return list(self._cache[word])

    def _ids(self, text):
        """Vocabulary ids of cleaned text, without start and end tokens, not truncated."""
        ids = []
        for piece in pre_tokenize(text):
            word = "".join(BYTE_TO_UNICODE[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[token] for token in self.bpe(word))
        return ids

    def encode(self, text):
        """Ids of one text: start, tokens, end; at most max_length ids, the end id kept last."""
        return [self.start_id, *self._ids(clean_text(text))[:self.max_length - 2], self.end_id]

    def truncated_text(self, text):
        """The words of `text` that do not fit in max_length ids (start and end included), or
        "" when all fit. Whole words, as the tokenizer reads them (lowercase, single spaces): a
        word whose first tokens fit and whose last do not is named too. Words are tokenized one
        by one, which gives the same tokens as the whole text: the split never crosses a space."""
        room = self.max_length - 2
        words = clean_text(text).split()
        for i, word in enumerate(words):
            room -= len(self._ids(word))
            if room < 0:
                return " ".join(words[i:])
        return ""

    def __call__(self, prompts):
        """LongTensor [B, max_length] of the prompts' ids, padded with pad_id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            encoded = self.encode(prompt)
            ids[row, :len(encoded)] = torch.tensor(encoded)
        return ids

    def decode(self, ids):
        """Text of token ids: start tokens are skipped and decoding stops at the first end token
        (what follows is padding); word ends become spaces; the result is stripped."""
        tokens = []
        for token_id in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if token_id == self.end_id:
                break
            if token_id != self.start_id:
                tokens.append(self._id_to_token[int(token_id)])
        text = bytes(UNICODE_TO_BYTE[c] for c in "".join(tokens)).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()


# ----------------------------------------------------------------------------------------------
# 3. The tokenizer's text clean-up, before BPE: the original CLIP tokenizer's ftfy.fix_text,
#    html.unescape and lower(), and its regex split pattern, in the standard library
#
# Where it cannot be the same as the original:
#   - ftfy also repairs mojibake (text decoded with the wrong codec, e.g. "cafÃ©" -> "café");
#     that repair is a large heuristic and is left out: such text is tokenized as written.
#   - Letters, digits and spaces are told apart with the running Python's unicodedata; the
#     original uses the `regex` package's tables, which may follow a newer Unicode version.
#     The two agree on every character assigned in Python's Unicode version.


def _html_entities():
    """ftfy's entity table: the HTML5 entities written with a semicolon, plus all-caps
    spellings of the lowercase ones ("&EACUTE;" -> "É") where HTML gives them no meaning."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


_HTML_ENTITIES = _html_entities()
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


def _unescape_entity(match):
    entity = match.group(0)
    if entity in _HTML_ENTITIES:
        return _HTML_ENTITIES[entity]
    if entity.startswith("&#"):  # numeric: only if the whole reference, semicolon included, decodes
        char = html.unescape(entity)
        return entity if ";" in char else char
    return entity


def _windows_1252(byte):
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:  # the 5 bytes Windows-1252 leaves undefined stay as they are
        return chr(byte)


# str.translate tables of the character-level fixes, in the order ftfy applies them.
# C1 controls U+0080-U+009F are read as the Windows-1252 characters of those bytes (as browsers do).
_C1_CONTROLS = {b: _windows_1252(b) for b in range(0x80, 0xA0)}
_LATIN_LIGATURES = {ord(k): v for k, v in {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}
# Full-width ASCII and half-width katakana/hangul (block U+FF01-U+FFEF) -> their usual forms
# (NFKC on that block only), and the ideographic space -> " ".
_CHARACTER_WIDTH = {0x3000: " "} | {
    cp: unicodedata.normalize("NFKC", chr(cp)) for cp in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(cp)) != chr(cp)}
_CURLY_QUOTES = {cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)} | {
    cp: '"' for cp in range(0x201C, 0x2020)}
# Invisible control characters (not tab, line feed, form feed, carriage return), the deprecated
# Arabic format controls, the byte-order mark, the interlinear annotation characters and the
# object replacement character.
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])
_TERMINAL_ESCAPE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")  # ANSI colours etc.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _join_surrogates(match):
    high, low = map(ord, match.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def _fix_line(text, unescape_html):
    """One line of ftfy.fix_text: apply every fix until none changes the text."""
    while True:
        before = text
        if unescape_html:
            text = _HTML_ENTITY.sub(_unescape_entity, text)
        # (ftfy repairs mojibake here; left out, see the top of this section)
        text = text.translate(_C1_CONTROLS)
        text = text.translate(_LATIN_LIGATURES)
        text = text.translate(_CHARACTER_WIDTH)
        text = text.translate(_CURLY_QUOTES)
        for line_break in ("\r\n", "\r", "\u2028", "\u2029", "\u0085"):
            text = text.replace(line_break, "\n")
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_join_surrogates, text))
        text = _TERMINAL_ESCAPE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text):
    """ftfy.fix_text (ftfy 6) without its mojibake repair: HTML entities, C1 controls, Latin
    ligatures, character width, curly quotes, line breaks, surrogates, terminal escapes,
    control characters and NFC, line by line."""
    lines, start, unescape_html = [], 0, True
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)  # the line with its "\n", or the rest
        line = text[start:end]
        if "<" in line:  # a literal "<" looks like real HTML: keep entities from this line on
            unescape_html = False
        lines.append(_fix_line(line, unescape_html))
        start = end
    return "".join(lines)


def clean_text(text):
    """The original CLIP clean-up: ftfy, HTML unescaped twice, whitespace collapsed, lowercase."""
    text = html.unescape(html.unescape(fix_text(text)))
    return " ".join(text.split()).lower()


# Pre-tokenization: the CLIP split pattern, without the regex package
#
# The original splits with the `regex` pattern (IGNORECASE)
#     <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
# i.e. at each position the first alternative that matches wins: a special token, an English
# contraction, a run of letters, ONE digit, or a run of "other" characters; whitespace is skipped.

_LITERALS = (START_TOKEN, END_TOKEN, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _char_class(char):
    """"L" letter, "N" number, "P" other, " " skipped, as the pattern's character classes see it."""
    category = unicodedata.category(char)
    if category[0] in "LN":
        return category[0]
    # regex's \s is Unicode White_Space: str.isspace() minus the separators U+001C-U+001F.
    # U+0345 (a combining mark) matches none of the classes under IGNORECASE: it is skipped.
    if (char.isspace() and char not in "\x1c\x1d\x1e\x1f") or char == "\u0345":
        return " "
    return "P"


def _fold(text):
    # IGNORECASE as `regex` applies it to the literals: simple case folding, where the only
    # non-ASCII character folding onto one of their letters is the long s.
    return text.lower().replace("ſ", "s")


def pre_tokenize(text):
    """Split (cleaned) text into the pieces that BPE encodes separately, as the pattern does."""
    pieces, i = [], 0
    while i < len(text):
        literal = next((s for s in _LITERALS if _fold(text[i:i + len(s)]) == s), None)
        kind = _char_class(text[i])
        if literal is not None:
            j = i + len(literal)
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:  # a run of letters, or a run of other characters
            j = i + 1
            while j < len(text) and _char_class(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces
