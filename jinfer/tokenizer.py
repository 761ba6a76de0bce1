"""Tokenizer: a `tokenizers` tokenizer.json plus BOS/EOS ids from the checkpoint's config files."""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers


class Tokenizer:
    """Encodes text to ids and back; knows the model's BOS and EOS ids."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool = True):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        self._tok.save(path)

    @classmethod
    def from_dir(cls, model_dir: str, *, bos_id: int | None = None,
                 eos_ids: tuple[int, ...] = ()) -> "Tokenizer":
        """Loads tokenizer.json; ids not given come from tokenizer_config.json's token strings."""
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise ValueError(f"missing file {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        tc_path = os.path.join(model_dir, "tokenizer_config.json")
        tc = {}
        if os.path.exists(tc_path):
            with open(tc_path) as f:
                tc = json.load(f)
        if bos_id is None:
            bos_id = _token_id(tok, tc.get("bos_token"))
        if not eos_ids:
            eos = _token_id(tok, tc.get("eos_token"))
            eos_ids = (eos,) if eos is not None else ()
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, add_bos=tc.get("add_bos_token", True))


def _token_id(tok: tokenizers.Tokenizer, token) -> int | None:
    if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
        token = token.get("content")
    return tok.token_to_id(token) if token else None


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
    """A 258-token byte-level tokenizer (256 bytes + BOS + EOS) for models with no tokenizer.json."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return Tokenizer(tok, bos_id=tok.token_to_id(BOS), eos_ids=(tok.token_to_id(EOS),))
