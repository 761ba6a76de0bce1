"""Tokenizer: a `tokenizers` tokenizer.json plus the checkpoint's config files, read the way
transformers' AutoTokenizer reads them (special tokens, chat template)."""

from __future__ import annotations

import functools
import json
import math
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, processors

# Tokenizer classes whose constructor rewrites tokenizer.json's post-processor in transformers 5:
# True adds BOS (when bos_token is set), False adds nothing. Every other class keeps the file's.
_CLASS_ADDS_BOS = {"CodeLlamaTokenizer": True, "GPTNeoXTokenizer": False}
# The named special tokens HF passes to chat templates (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # HF's aliases, first one standard


_GIL_FREE_CHARS = 4096
"""Texts this long are tokenized with the GIL released (a 4 MB prompt takes seconds)."""


class Tokenizer:
    """Encodes text to ids and back; knows the model's BOS and EOS ids and its chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 chat_template: str | None = None, template_tokens: dict[str, str] | None = None):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_template = chat_template  # jinja source; None when the model has none
        self.template_tokens = dict(template_tokens or {})  # variables a template sees: {"bos_token": "<s>", ...}
        # Whether encode(text) starts with BOS, i.e. the post-processor adds it.
        self.add_bos = bos_id is not None and tok.encode("").ids[:1] == [bos_id]
        self._compiled: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The tokenizers.Tokenizer it wraps: its JSON (to_str) is what HF's fast tokenizer
        serialises (backend_tokenizer.to_str()), and another Tokenizer can wrap a copy of it."""
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. By default the ids HF's `AutoTokenizer(text)["input_ids"]` gives:
        the post-processor adds BOS/EOS or not. add_special_tokens=False gives the bare ids, which
        is how HF tokenizes a rendered chat template. add_bos, when given, forces whether the ids
        start with BOS (a no-op without bos_id)."""
        if len(text) < _GIL_FREE_CHARS:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        else:  # encode_batch lets other threads run meanwhile (a server's engine thread); encode holds the GIL
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        has_bos = add_special_tokens and self.add_bos
        want_bos = has_bos if add_bos is None else add_bos and self.bos_id is not None
        if has_bos and not want_bos:
            return ids[1:]
        if want_bos and not has_bos:
            return [self.bos_id] + ids
        return ids

    @functools.cached_property
    def max_bytes_per_token(self) -> int | None:
        """The most UTF-8 bytes of input text one token can stand for; None where this
        tokenizer can drop or shrink text without bound (then no byte bound is safe)."""
        return _max_bytes_per_token(self._tok)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, add_special_tokens=False)) from the text's byte
        length alone, without tokenizing (0 where max_bytes_per_token is None): a server
        refuses a prompt that cannot fit before it spends time and memory tokenizing it."""
        per_token = self.max_bytes_per_token
        return -(-len(text.encode("utf-8", "surrogatepass")) // per_token) if per_token else 0

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        self._tok.save(path)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat as text, rendered as HF's `apply_chat_template(messages, tokenize=False)` does.

        The text already holds the template's special tokens (BOS included, if the template
        writes it): tokenize it with `encode(text, add_special_tokens=False)` to get HF's
        `apply_chat_template(..., tokenize=True)` ids."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja)")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        messages = _template_messages(messages)
        try:
            if self._compiled is None:
                self._compiled = _compile_template(self.chat_template)
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.template_tokens)
        except Exception as e:  # syntax errors, raise_exception(), bad message fields: all template problems
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e

    @classmethod
    def from_dir(cls, model_dir: str, *, bos_id: int | None = None,
                 eos_ids: tuple[int, ...] = ()) -> "Tokenizer":
        """Loads tokenizer.json, tokenizer_config.json and chat_template.jinja as transformers 5's
        AutoTokenizer does. Whether encode adds BOS/EOS is up to tokenizer.json's post-processor:
        HF ignores tokenizer_config.json's add_bos_token/add_eos_token when tokenizer.json exists;
        only a tokenizer_class of CodeLlamaTokenizer (BOS) or GPTNeoXTokenizer (nothing) replaces
        it. bos_id/eos_ids not given come from tokenizer_config.json's token strings."""
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise ValueError(f"missing file {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        tok.no_truncation()  # HF turns the file's truncation and padding off unless a call asks
        tok.no_padding()
        tc = {}
        tc_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(tc_path):
            with open(tc_path) as f:
                tc = json.load(f)
        tok.encode_special_tokens = bool(tc.get("split_special_tokens", False))
        tokens = _template_tokens(tc)
        class_adds_bos = _CLASS_ADDS_BOS.get((tc.get("tokenizer_class") or "").removesuffix("Fast"))
        if class_adds_bos is not None:
            tok.post_processor = _bos_processor(tok, tokens.get("bos_token") if class_adds_bos else None)
        if bos_id is None:
            bos_id = _token_id(tok, tokens.get("bos_token"))
        if not eos_ids:
            eos = _token_id(tok, tokens.get("eos_token"))
            eos_ids = (eos,) if eos is not None else ()
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, chat_template=_read_chat_template(model_dir, tc),
                   template_tokens=tokens)


# Pieces of a tokenizer that never drop input text, and how much at most the normalizers
# among them shrink it: Unicode normalization maps one character to fewer bytes (NFD/NFC: the
# 3-byte Kelvin sign to "K"; NFKC/NFKD: the 4-byte U+1D400 to "A"; composition: three 3-byte
# Hangul jamo to one 3-byte syllable), lowercasing the Kelvin sign gives "k". Anything else
# (Strip, a Regex Replace, BERT's whitespace split, fused unknowns, added tokens that swallow
# whitespace, ...) can drop text without bound, so no byte bound is taken for it.
_KEEPING_NORMALIZERS = {"Prepend": 1, "NFC": 3, "NFD": 3, "NFKC": 4, "NFKD": 4, "Lowercase": 3}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def _max_bytes_per_token(tok: tokenizers.Tokenizer) -> int | None:
    spec = json.loads(tok.to_str())

    def shrink(norm) -> float | None:
        if norm is None:
            return 1
        kind = norm["type"]
        if kind == "Sequence":
            factors = [shrink(n) for n in norm["normalizers"]]
            return None if None in factors else math.prod(factors)
        if kind == "Replace":  # a literal pattern shrinks text by its length over the content's
            pattern, content = norm["pattern"].get("String"), norm["content"].encode()
            return max(1, len(pattern.encode()) / len(content)) if pattern and content else None
        return _KEEPING_NORMALIZERS.get(kind)

    def keeps(pre) -> bool:
        if pre is None:
            return True
        if pre["type"] == "Sequence":
            return all(keeps(p) for p in pre["pretokenizers"])
        if pre["type"] == "Split":
            return pre["behavior"] != "Removed"
        return pre["type"] in _KEEPING_PRE_TOKENIZERS

    model = spec["model"]
    if model["type"] == "Unigram":  # unknown characters always fuse into one token
        fuses = not model.get("byte_fallback")
    else:
        fuses = model.get("unk_token") is not None and model["type"] != "BPE" or (
            model.get("fuse_unk") and not model.get("byte_fallback"))
    strips = any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or ())
    factor = shrink(spec.get("normalizer"))
    if factor is None or fuses or strips or not keeps(spec.get("pre_tokenizer")):
        return None
    longest = max(len(t.encode("utf-8")) for t in tok.get_vocab(with_added_tokens=True))
    return math.ceil(longest * factor)


def _token_id(tok: tokenizers.Tokenizer, token: str | None) -> int | None:
    return tok.token_to_id(token) if token else None


def _bos_processor(tok: tokenizers.Tokenizer, bos: str | None) -> processors.TemplateProcessing:
    """The post-processor HF's update_post_processor builds: BOS then the text, or the text alone."""
    return template_processor(tok, bos if _token_id(tok, bos) is not None else None, None)


def template_processor(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """HF's update_post_processor: [BOS] text [EOS] (each when given), pairs likewise."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = [(t, tok.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _template_tokens(tc: dict) -> dict[str, str]:
    """Special-token strings from tokenizer_config.json, as HF's special_tokens_map: the named ones
    (string or serialised AddedToken), model-specific "*_token" strings and extra_special_tokens."""
    out = {}
    for key, value in tc.items():
        if isinstance(value, dict) and key in _NAMED_TOKENS:
            value = value.get("content")  # AddedToken serialised as {"content": ...}
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    extra = tc.get("extra_special_tokens")
    if isinstance(extra, dict):
        out.update({k: v for k, v in extra.items() if isinstance(v, str)})
    return out


def _read_chat_template(model_dir: str, tc: dict) -> str | None:
    """HF's default template: chat_template.jinja (or additional_chat_templates/default.jinja),
    which override tokenizer_config.json's chat_template (a string, or a list of named ones)."""
    files = {}
    if os.path.exists(os.path.join(model_dir, "chat_template.jinja")):
        files["default"] = os.path.join(model_dir, "chat_template.jinja")
    extra_dir = os.path.join(model_dir, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        files.update({n.removesuffix(".jinja"): os.path.join(extra_dir, n)
                      for n in os.listdir(extra_dir) if n.endswith(".jinja")})
    if files:
        if "default" not in files:
            return None
        with open(files["default"], encoding="utf-8") as f:
            return f.read()
    template = tc.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as HF hands them to the template: keys whose value is None dropped (templates test
    for a missing key), the reasoning text under both "thinking" and "reasoning_content"."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it): renders the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's override: jinja's own tojson escapes HTML characters and takes no separators
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(template: str) -> jinja2.Template:
    """The template in HF's environment: sandboxed, trim_blocks, lstrip_blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


BOS, EOS = "<s>", "</s>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table, which the ByteLevel pre-tokenizer uses: printable bytes map to themselves,
    the others to 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer() -> Tokenizer:
    """A 258-token byte-level tokenizer (256 bytes + BOS + EOS) for models with no tokenizer.json.
    encode adds BOS (its post-processor does, so a saved copy does the same under HF)."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = _bos_processor(tok, BOS)
    return Tokenizer(tok, bos_id=tok.token_to_id(BOS), eos_ids=(tok.token_to_id(EOS),),
                     template_tokens={"bos_token": BOS, "eos_token": EOS})
