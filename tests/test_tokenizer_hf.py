"""Tokenizer.from_dir agrees with transformers' AutoTokenizer: the same ids (BOS/EOS by HF's rule),
the same chat-template text and chat ids. The tokenizers are trained here on a few sentences."""

import functools
import json
import os

import pytest

transformers = pytest.importorskip("transformers", minversion="5")  # jinfer follows transformers 5's rule
import tokenizers  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from jinfer.tokenizer import Tokenizer, byte_level_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer",
          "a naïve café serves crème brûlée", "def f(x):\n    return x + 1\n"]
TEXTS = ["", "hello world", "The quick brown fox jumps over the lazy dog.", "naïve café — 日本語 🙂",
         "  two spaces\nand a newline", "<s> a literal special token </s>",
         "a long text, tokenized with the GIL released: naïve café <s> 🙂\n" * 200]
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|im_start|>", "<|im_end|>"]


@functools.cache
def _byte_level(specials: tuple[str, ...] = tuple(SPECIALS)) -> str:
    """GPT-2 style, also what GPTNeoXTokenizer rebuilds: NFC, ByteLevel, BPE."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


@functools.cache
def _metaspace() -> str:
    """Llama-2 style, as LlamaTokenizer rebuilds it in transformers 5: Metaspace, BPE with byte fallback."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS,
                                                            show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # every byte has a token, so nothing falls back to <unk>
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m) for m in model["merges"]], unk_token="<unk>",
                                          fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def _post_processor(kind: str, tok: tokenizers.Tokenizer, bos: str = "<s>", eos: str = "</s>"):
    specials = [(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    template = {"bos": (f"{bos} $A", f"{bos} $A {bos} $B"),
                "bos_eos": (f"{bos} $A {eos}", f"{bos} $A {eos} {bos} $B {eos}")}[kind]
    return processors.TemplateProcessing(single=template[0], pair=template[1], special_tokens=specials)


def _write(path, tok_json: str, post: str, config: dict, files: dict | None = None) -> str:
    tok = tokenizers.Tokenizer.from_str(tok_json)
    if post != "none":
        tok.post_processor = _post_processor(post, tok, config.get("bos_token") or "<s>",
                                             config.get("eos_token") or "</s>")
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    for name, text in (files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


# tokenizer_class -> the pipeline HF uses with it: ByteLevel files load with the generic class
# (even under LlamaTokenizerFast); LlamaTokenizer and CodeLlamaTokenizer rebuild a Metaspace one.
PIPELINES = {None: _byte_level, "PreTrainedTokenizerFast": _byte_level, "LlamaTokenizerFast": _byte_level,
             "GPTNeoXTokenizerFast": _byte_level, "LlamaTokenizer": _metaspace, "CodeLlamaTokenizer": _metaspace}


@pytest.mark.parametrize("bos_token", ["<s>", None])
@pytest.mark.parametrize("add_bos_token", ["absent", True, False])
@pytest.mark.parametrize("post", ["none", "bos", "bos_eos"])
@pytest.mark.parametrize("tokenizer_class", list(PIPELINES))
def test_ids_equal_autotokenizer(tmp_path, tokenizer_class, post, add_bos_token, bos_token):
    config = {"bos_token": bos_token, "eos_token": "</s>"}
    if add_bos_token != "absent":
        config["add_bos_token"] = add_bos_token
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    path = _write(tmp_path, PIPELINES[tokenizer_class](), post, config)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.bos_id == hf.bos_token_id and ours.eos_ids == (hf.eos_token_id,)


def test_post_processor_decides_bos_and_add_bos_token_is_ignored(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    with_bos = Tokenizer.from_dir(_write(tmp_path / "a", _byte_level(), "bos", {**config, "add_bos_token": False}))
    without = Tokenizer.from_dir(_write(tmp_path / "b", _byte_level(), "none", {**config, "add_bos_token": True}))
    bos = with_bos.bos_id
    assert bos == 1 and with_bos.add_bos and not without.add_bos
    assert with_bos.encode("hello") == [bos] + without.encode("hello")
    # add_bos overrides either way, for callers that need one or the other
    assert with_bos.encode("hello", add_bos=False) == without.encode("hello")
    assert without.encode("hello", add_bos=True) == with_bos.encode("hello")


def test_byte_level_tokenizer_adds_bos_here_and_when_saved_for_hf(tmp_path):
    tok = byte_level_tokenizer()
    assert tok.encode("hé") == [256, ord("h"), 0xC3, 0xA9]
    assert tok.encode("hé", add_bos=False) == [ord("h"), 0xC3, 0xA9]
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"] == Tokenizer.from_dir(str(tmp_path)).encode(text)


def test_truncation_and_padding_saved_in_tokenizer_json_are_off(tmp_path):
    tok = tokenizers.Tokenizer.from_str(_byte_level())
    tok.enable_truncation(max_length=3)
    tok.enable_padding(length=40, pad_id=0, pad_token="<unk>")
    path = _write(tmp_path, tok.to_str(), "bos", {"bos_token": "<s>"})
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
    assert len(ours.encode(TEXTS[2])) > 3 and len(ours.encode(TEXTS[1])) < 40


LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message.reasoning_content is defined %}
        {{- '<think>' + message.reasoning_content + '</think>' }}
    {%- endif %}
    {%- if message.tool_calls is defined %}
        {{- message.tool_calls | tojson + '<|eot_id|>' }}
        {%- continue %}
    {%- endif %}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Written without "-" so that trim_blocks and lstrip_blocks decide the whitespace.
CHATML_TEMPLATE = """{% for message in messages %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}
{% else %}{{ message['content'] }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CHATS = {
    "plain": [{"role": "system", "content": "  You are terse: answer in <10 words & use \"quotes\".  "},
              {"role": "user", "content": "What's 2+2? Réponds en français 🙂"},
              {"role": "assistant", "content": "4 — quatre.", "reasoning": "easy"},
              {"role": "user", "content": "And 3+3?"}],
    "tool_call": [{"role": "user", "content": "Add 3 and <3>."},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"name": "add", "arguments": {"a": 3, "b": "<3> é"}}]},
                  {"role": "user", "content": "Thanks."}],
}


def _chat_dir(path, template: str, in_jinja_file: bool) -> str:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>"}
    files = {"chat_template.jinja": template} if in_jinja_file else {}
    if not in_jinja_file:
        config["chat_template"] = template
    return _write(path, _byte_level(tuple(SPECIALS + CHAT_SPECIALS)), "bos", config, files)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("template, in_jinja_file", [(LLAMA3_TEMPLATE, False), (CHATML_TEMPLATE, True)],
                         ids=["llama3_in_config", "chatml_in_jinja_file"])
def test_chat_template_text_and_ids_equal_autotokenizer(tmp_path, template, in_jinja_file, chat,
                                                        add_generation_prompt):
    path = _chat_dir(tmp_path, template, in_jinja_file)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == hf.chat_template == template
    messages = CHATS[chat]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                    return_dict=False)
    assert ours.encode(text, add_special_tokens=False) == hf_ids
    if template is LLAMA3_TEMPLATE:  # the template writes BOS; HF does not add a second one
        assert hf_ids[:2] == [ours.bos_id, ours.encode("<|start_header_id|>", add_special_tokens=False)[0]]


def test_chat_template_file_overrides_config(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE}
    path = _write(tmp_path, _byte_level(), "none", config, {"chat_template.jinja": CHATML_TEMPLATE})
    assert Tokenizer.from_dir(path).chat_template == transformers.AutoTokenizer.from_pretrained(path).chat_template
    assert Tokenizer.from_dir(path).chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("template, messages, message", [
    (None, CHATS["plain"], "this model has no chat template"),
    (LLAMA3_TEMPLATE, [], "empty conversation"),
    (LLAMA3_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "chat template failed: TemplateError: Conversation roles must alternate"),
    ("{% for m in messages %}{{ m.content }}", CHATS["plain"], "chat template failed: TemplateSyntaxError"),
    (LLAMA3_TEMPLATE, ["not a dict"], "chat messages must be dicts, got 'not a dict'"),
])
def test_chat_template_errors_name_the_problem(tmp_path, template, messages, message):
    config = {"bos_token": "<s>"} | ({"chat_template": template} if template else {})
    tok = Tokenizer.from_dir(_write(tmp_path, _byte_level(), "none", config))
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(messages)


def test_chat_template_sees_the_special_tokens_hf_passes(tmp_path):
    added_token = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True}
    template = "{{ bos_token }}|{{ eos_token }}|{{ image_token }}|{{ pad_token }}|{{ foo_token }}|{{ unk_token }}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added_token, "eos_token": "</s>",
              "image_token": "<unk>", "pad_token": None, "foo_token": {"content": "x"}, "chat_template": template}
    path = _write(tmp_path, _byte_level(), "none", config)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    text = ours.apply_chat_template(CHATS["plain"], add_generation_prompt=False)
    assert text == hf.apply_chat_template(CHATS["plain"], tokenize=False) == "<s>|</s>|<unk>|||"
    assert ours.bos_id == hf.bos_token_id == 1
