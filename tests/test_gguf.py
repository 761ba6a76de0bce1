"""GGUF loading against transformers' own GGUF loading, on small files the tests write: weights
in many GGML types, both tokenizer kinds, q/k permutation, config from metadata, clear errors."""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.launch import ModelSpec, load_model, load_tokenizer
from jinfer.loader import gguf as jg
from jinfer.loader.gguf_tokenizer import merges_from_scores, tokenizer_from_gguf
from jinfer.sampling_params import SamplingParams
from tests import gguf_files as G
from tests.hf_models import hf_greedy
from tests.test_model_parity import _ragged_forward

# Every dequantizable family: legacy block quants, K-quants, half floats.
TYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.BF16, "ffn_gate": Q.Q5_K,
         "ffn_up": Q.Q6_K, "ffn_down": Q.Q4_K, "token_embd": Q.Q5_0, "output.weight": Q.Q4_0}
TEXTS = G.corpus(120, seed=7) + [
    "", " ", "  two leading", "trailing  ", "\n\n\t", "<|im_start|>user\nhi<|im_end|>", "<think>x</think> y",
    "<s>a</s>", "<tool> z", "éé ÿ \U0001F600 東京", "don't stop", "x" * 300, "1234567890", "a\r\nb"]


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt2-llama-bpe"])
def files(request, tmp_path_factory):
    """(kind, path of the GGUF, transformers' model and tokenizer loaded from it); gpt2-llama-bpe:
    a byte-level file whose tokenizer.ggml.pre names a split regex (Llama 3's)."""
    kind = request.param
    vocab = G.llama_vocab() if kind == "llama" else G.gpt2_vocab()
    if kind == "gpt2-llama-bpe":
        vocab["pre"] = "llama-bpe"
    path = str(tmp_path_factory.mktemp("gguf") / f"{kind}.gguf")
    G.write_gguf(path, G.build_hf(len(vocab["tokens"])), vocab, TYPES)
    return (kind, path) + G.hf_from_gguf(path)


def test_weights_and_config_equal_transformers_gguf_loading(files):
    kind, path, hf_model, _ = files
    f = jg.open_gguf(path)
    cfg = jg.config_from_gguf(f)
    hc = hf_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.head_dim) == (hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size,
                                              hc.num_attention_heads, hc.num_key_value_heads, hc.vocab_size,
                                              hc.head_dim)
    assert cfg.rms_norm_eps == pytest.approx(hc.rms_norm_eps) and cfg.rope_theta == hc.rope_parameters["rope_theta"]
    assert cfg.tie_word_embeddings is False and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    ours = jg.gguf_tensors(f, cfg)
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs)
    for name, w in ours.items():  # the same dequantization and the same row order, bit for bit
        np.testing.assert_array_equal(w, theirs[name].numpy(), err_msg=name)


def test_logits_and_greedy_tokens_match_transformers(files):
    kind, path, hf_model, hf_tok = files
    model, tok = load_model(ModelSpec(path=path))
    prompts = [tok.encode(t) for t in ("the model reads", "def class return value cache", "東京 123")]
    for prompt, got in zip(prompts, _ragged_forward(model, prompts)):
        with torch.no_grad():
            want = hf_model(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(got - want).max() <= 1e-4
    engine = Engine(model, tok, CacheConfig(page_size=4, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf_model, prompt, 12, eos_id=2)


def test_tokenizer_equals_transformers(files):
    kind, path, _, hf_tok = files
    tok = load_tokenizer(ModelSpec(path=path))
    assert json.loads(tok.backend.to_str()) == json.loads(hf_tok.backend_tokenizer.to_str())
    assert len(TEXTS) >= 100
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
    assert tok.add_bos == (kind == "llama") and tok.bos_id == 1 and tok.eos_ids == (2,)
    assert tok.vocab_size == hf_tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "東京?"},
              {"role": "assistant", "content": "a city"}, {"role": "user", "content": "more"}]]
    for chat in chats:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want
            assert tok.encode(want, add_special_tokens=False) == hf_tok.apply_chat_template(
                chat, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_own_block_dequantizing_equals_the_gguf_package(qtype, monkeypatch):
    """jinfer's whole-array Q4_1 / Q8_0 dequantizer gives gguf.quants.dequantize's values bit for
    bit, chunked or not (real quantized weights, and raw random bytes whose scales include
    infinities, NaN and subnormals)."""
    rng = np.random.default_rng(int(qtype))
    weights = rng.normal(size=(37, 96)).astype(np.float32)
    type_size = jg._BLOCKS[qtype.name][0]
    for data in (gguf.quants.quantize(weights, qtype),
                 rng.integers(0, 256, size=(37, 3 * type_size), dtype=np.uint8)):
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the random scales
            want = gguf.quants.dequantize(data, qtype)
            for chunk in (1 << 22, 64):  # one chunk; chunks of one row
                monkeypatch.setattr(jg, "_CHUNK_VALUES", chunk)
                got = jg._dequantize_blocks(data, qtype.name)
                assert got.shape == want.shape == (37, 96) and got.dtype == np.float32
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_pre_tokenizer_splits_are_transformers_table():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    from jinfer.loader.gguf_tokenizer import PRE_TOKENIZER_SPLITS
    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_merges_recovered_from_scores_equal_transformers():
    from transformers.tokenization_utils_base import generate_merges
    vocab = G.llama_vocab()
    tokens, scores = vocab["tokens"], vocab["scores"]
    want = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    assert merges_from_scores(tokens, scores) == want and len(want) > 100


def test_qwen2_file_keeps_rows_and_reads_biases_and_tied_embeddings(tmp_path):
    vocab = G.gpt2_vocab()
    hf = G.build_hf(len(vocab["tokens"]), arch="qwen2", tie=True)
    path = G.write_gguf(str(tmp_path / "q.gguf"), hf, vocab, {"attn_q": Q.Q8_0}, arch="qwen2")
    hf_model, _ = G.hf_from_gguf(path)
    model, tok = load_model(ModelSpec(path=str(tmp_path)))  # a directory holding one GGUF file
    cfg = model.config
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias and cfg.tie_word_embeddings
    prompt = tok.encode("the model reads tokens")
    with torch.no_grad():
        want = hf_model(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(_ragged_forward(model, [prompt])[0] - want).max() <= 1e-4
    assert ModelSpec(path=path).display_name == "q"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A valid two-layer F32 file to break in the error tests, with its model."""
    vocab = G.gpt2_vocab()
    hf = G.build_hf(len(vocab["tokens"]), hidden=256)
    path = str(tmp_path_factory.mktemp("small") / "ok.gguf")
    return G.write_gguf(path, hf, vocab), hf, vocab


def _error(path) -> str:
    with pytest.raises(ValueError) as e:
        load_model(ModelSpec(path=str(path)))
    return str(e.value)


def test_bad_files_get_errors_naming_the_problem(small, tmp_path):
    path, hf, vocab = small
    data = open(path, "rb").read()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(tmp_path / "trunc.gguf")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    assert "is not a GGUF file" in _error(tmp_path / "notgguf.gguf")
    assert f"GGUF file '{tmp_path / 'missing.gguf'}' does not exist" in _error(tmp_path / "missing.gguf")
    arch = G.write_gguf(str(tmp_path / "arch.gguf"), hf, vocab, general_arch="gpt2")
    assert "unsupported GGUF architecture 'gpt2'" in _error(arch)
    no_ffn = G.write_gguf(str(tmp_path / "noffn.gguf"), hf, vocab, drop=("ffn_down",))
    assert f"{no_ffn}: checkpoint is missing tensor 'model.layers.0.mlp.down_proj.weight'" in _error(no_ffn)
    both = tmp_path / "two"
    both.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (both / name).write_bytes(data)
    assert "holds 2 GGUF files" in _error(both)
    (both / "config.json").write_text("{}")  # an HF checkpoint directory wins over GGUF files beside it
    assert "unsupported model_type=None" in _error(both)  # read as an HF config.json


def _rewrite(src: str, dst: str, *, drop_key: str | None = None, tensor_type: tuple[str, int] | None = None,
             extra_tensor: str | None = None):
    """A copy of `src` with one metadata key dropped, one tensor's type changed or a tensor added."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == drop_key:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if tensor_type and t.name == tensor_type[0]:
            w.add_tensor(t.name, np.zeros(t.data.shape, np.uint8).reshape(t.data.shape[0], -1).view(np.uint8),
                         raw_shape=tuple(int(x) for x in reversed(t.shape)), raw_dtype=Q(tensor_type[1]))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=Q(t.tensor_type))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_missing_metadata_and_unsupported_tensors_are_named(small, tmp_path):
    path = small[0]
    no_layers = _rewrite(path, str(tmp_path / "nolayers.gguf"), drop_key="llama.block_count")
    assert "missing metadata key 'llama.block_count'" in _error(no_layers)
    no_tok = _rewrite(path, str(tmp_path / "notok.gguf"), drop_key="tokenizer.ggml.model")
    assert "missing metadata key 'tokenizer.ggml.model'" in _error(no_tok)
    i32 = _rewrite(path, str(tmp_path / "i32.gguf"), tensor_type=("blk.0.attn_norm.weight", Q.I32))
    assert "tensor 'blk.0.attn_norm.weight' has type I32" in _error(i32)
    rope = _rewrite(path, str(tmp_path / "rope.gguf"), extra_tensor="rope_freqs.weight")
    assert "rope_freqs" in _error(rope)
    odd = _rewrite(path, str(tmp_path / "odd.gguf"), extra_tensor="blk.0.ssm_in.weight")
    assert "cannot use: ['blk.0.ssm_in.weight']" in _error(odd)


@pytest.mark.multi_device
def test_a_gguf_file_loads_straight_into_tp_shards(small):
    from sharding.tp import make_mesh
    path = small[0]
    plain, _ = load_model(ModelSpec(path=path))
    sharded, _ = load_model(ModelSpec(path=path, tp=2), make_mesh(2))
    for get in (lambda m: m.layers[0].attn.q_proj, lambda m: m.layers[1].mlp.down_proj, lambda m: m.embed):
        w = get(sharded).get_value()
        assert len(w.sharding.device_set) == 2
        np.testing.assert_array_equal(np.asarray(w), np.asarray(get(plain).get_value()))


def test_the_byte_bound_on_tokens_never_exceeds_the_token_count(files):
    """Servers refuse prompts too long to fit from their bytes (Tokenizer.min_tokens); a bound
    above the real count would refuse a valid prompt."""
    tok = tokenizer_from_gguf(jg.open_gguf(files[1]))
    assert tok.max_bytes_per_token is not None
    for text in TEXTS + [t * 7 for t in TEXTS[:20]]:
        assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False)), text
