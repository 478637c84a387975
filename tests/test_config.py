import pytest

from minillm.model.config import LMConfig


def test_defaults_are_the_small_model():
    c = LMConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        6400, 512, 8, 8, 2)
    assert c.intermediate_size == 1408  # 8/3 * 512 = 1365.3 rounded up to a multiple of 64
    assert c.head_dim == 64
    assert (c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (2048, 1e6, 1e-5)
    assert c.tie_word_embeddings and not c.attention_bias


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_attention_heads=8), "must divide hidden_size"),
    (dict(num_attention_heads=8, num_key_value_heads=3), "must divide num_attention_heads"),
    (dict(hidden_size=24, num_attention_heads=8, num_key_value_heads=8), "must be even"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=10, eos_token_id=10), "eos_token_id"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**kwargs)


def test_json_round_trip(tmp_path):
    c = LMConfig(vocab_size=321, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, dropout=0.1)
    c.save_json(tmp_path / "c.json")
    assert LMConfig.load_json(tmp_path / "c.json") == c
    with pytest.raises(ValueError, match="unknown LMConfig fields: hiden_size"):
        LMConfig.from_dict({"hiden_size": 3})


@pytest.mark.parametrize("bias", [False, True])
def test_hf_round_trip(bias):
    c = LMConfig(vocab_size=321, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                 attention_bias=bias, tie_word_embeddings=not bias, rope_theta=5e5)
    d = c.to_hf_dict()
    assert d["model_type"] == ("qwen2" if bias else "llama")
    assert d["rope_parameters"]["rope_theta"] == 5e5
    assert LMConfig.from_hf_dict(d) == c


def test_hf_config_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    d = LMConfig(vocab_size=321, hidden_size=96, num_attention_heads=6, num_key_value_heads=3).to_hf_dict()
    hf = transformers.LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert (hf.hidden_size, hf.num_key_value_heads, hf.intermediate_size) == (96, 3, 256)


def test_unsupported_hf_configs_are_refused():
    base = LMConfig(vocab_size=50, hidden_size=32, num_attention_heads=4).to_hf_dict()
    with pytest.raises(ValueError, match="model_type"):
        LMConfig.from_hf_dict({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        LMConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        LMConfig.from_hf_dict({**base, "hidden_act": "gelu"})
