"""The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*`), built as a `tokenizers`
tokenizer the way transformers' GGUF loading builds it, so token ids, decoding and the chat
template equal HF's `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.

Two kinds: `gpt2` (byte-level BPE: vocabulary spelled in GPT-2's byte alphabet, merges listed)
and `llama` (SentencePiece BPE: `▁` for spaces, `<0xNN>` byte fallback, merges listed or
recovered from the token scores).
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from jinfer.loader.gguf import GGUFFile
from jinfer.tokenizer import Tokenizer, _bytes_to_unicode, template_processor

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with; other values (SmolLM2's
# "smollm", "default", "gpt2") keep byte-level BPE's own GPT-2 regex, as transformers does.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Whether encode adds BOS when the file has no tokenizer.ggml.add_bos_token (transformers' defaults:
# a SentencePiece vocabulary adds it, as llama.cpp does for one that does not say otherwise).
_DEFAULT_ADD_BOS = {"gpt2": False, "llama": True}


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer:
    """The file's tokenizer: vocabulary, merges, special tokens, BOS/EOS, chat template."""
    kind = f.require("tokenizer.ggml.model")
    if kind not in _DEFAULT_ADD_BOS:
        raise ValueError(f"{f.path}: unsupported tokenizer.ggml.model={kind!r}; supported: {sorted(_DEFAULT_ADD_BOS)}")
    tokens = list(f.require("tokenizer.ggml.tokens"))
    types = list(f.get("tokenizer.ggml.token_type") or [])
    tok = _byte_level(f, tokens) if kind == "gpt2" else _sentencepiece(f, tokens)
    named = {name: _token(tokens, f.get(f"tokenizer.ggml.{key}"), f.path, key) for name, key in
             (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
              ("pad_token", "padding_token_id"))}
    spelled = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    # Control tokens stay whole and are skipped when decoding; a control token spelled outside the
    # byte alphabet in a byte-level vocabulary is a mislabel that HF leaves out, and so do we.
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and (spelled is None or set(t) <= spelled)]
    if kind == "llama":  # LlamaTokenizer's own defaults, added when the vocabulary has them
        control += [t for t in ("<unk>", "<s>", "</s>") if t in set(tokens) and t not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()  # byte-level spellings: a user-defined token spelled otherwise is left out, as HF does
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    named_present = [t for t in named.values() if t is not None and t not in control]
    tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(named_present)])
    split = PRE_TOKENIZER_SPLITS.get(f.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", _DEFAULT_ADD_BOS[kind])) and named["bos_token"] is not None
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False)) and named["eos_token"] is not None
    tok.post_processor = template_processor(tok, named["bos_token"] if add_bos else None,
                                         named["eos_token"] if add_eos else None)
    bos_id, eos_id = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(tok, bos_id=int(bos_id) if bos_id is not None else None,
                     eos_ids=(int(eos_id),) if eos_id is not None else (),
                     chat_template=f.get("tokenizer.chat_template"),
                     template_tokens={k: v for k, v in named.items() if v is not None})


def _token(tokens: list[str], index, path: str, key: str) -> str | None:
    if index is None:
        return None
    if not 0 <= int(index) < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{key}={index} is outside the vocabulary of {len(tokens)}")
    return tokens[int(index)]


def _merges(f: GGUFFile, tokens: list[str]) -> list[tuple[str, str]]:
    listed = f.get("tokenizer.ggml.merges")
    if listed is not None:
        out = [tuple(m.split(" ")) for m in listed]
        bad = next((m for m in out if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{f.path}: tokenizer.ggml.merges holds {' '.join(bad)!r}, not two tokens")
        return out
    scores = f.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError(f"{f.path} has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return merges_from_scores(tokens, list(scores))


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored tokens' splits first (ties: shorter left part, then shorter right part), as
    transformers' generate_merges orders them."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in dict(zip(tokens, scores)).items():  # a repeated token counts once, as in HF
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        splits.sort(key=lambda lr: (index[lr[0]], index[lr[1]]))
        found.extend((left, right, score) for left, right in splits)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _byte_level(f: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2 style BPE; tokens not spelled in the byte alphabet are respelled into it."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(f, tokens), dropout=None,
                                          continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(f: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    """Llama/Mistral SentencePiece BPE with byte fallback, as transformers' LlamaTokenizer."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(f, tokens), fuse_unk=True,
                                          byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok
