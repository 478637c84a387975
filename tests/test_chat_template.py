"""Outside chat templates (issue 31, part 1): rendered as transformers renders them, message text kept as text,
SFT masks by prefix rendering, generation stopping at the template's own end marker."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import late_specials_backend, run_train_cli

from minillm.data.chat_template import TemplateError
from minillm.data.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
          "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "You are a helpful assistant. Answer briefly."] * 5

# Written over several lines as the real ones are: the output is right only with transformers' Jinja settings
# (trim_blocks, lstrip_blocks).
LLAMA3 = """{{ bos_token }}
{%- for message in messages %}
    {% set content = message['content'] | trim %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content + '<|eot_id|>' }}
{%- endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
         "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
         "{% for message in rest %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
QWEN3 = ("{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
         "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
         "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|eom_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
               "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, "<end_of_turn>"),
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
}
SINGLE = [{"role": "user", "content": "Hello there, how are you?"},
          {"role": "assistant", "content": "The fox is quick today."}]
MULTI = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "白日依山尽"}, {"role": "assistant", "content": "黄河入海流。"},
         {"role": "user", "content": "  How are you today?\n"}, {"role": "assistant", "content": " Briefly: well. "}]


def save_style(name: str, directory, in_config: bool = False):
    """A tokenizer of the style saved by transformers; (our tokenizer, transformers'). in_config: the template in
    tokenizer_config.json rather than chat_template.jinja."""
    template, specials, tokens, _ = STYLES[name]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=late_specials_backend(CORPUS, specials), **tokens)
    hf.chat_template = template
    hf.save_pretrained(directory)
    jinja = directory / "chat_template.jinja"
    if in_config and jinja.exists():
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = jinja.read_text()
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        jinja.unlink()
    return load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("in_config", [False, True])
@pytest.mark.parametrize("style", list(STYLES))
def test_rendering_and_ids_equal_transformers(style, in_config, tmp_path):
    ours, hf = save_style(style, tmp_path, in_config)
    conversations = [SINGLE, SINGLE[:1]] + ([MULTI, MULTI[:4]] if style != "qwen3" else [MULTI[:2]])
    for messages in conversations:
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == text
            ids, _ = ours.render_conversation(messages, add_generation_prompt=gen)
            assert ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                                 return_dict=False), (style, messages, gen)


@pytest.mark.parametrize("style", list(STYLES))
def test_mask_covers_exactly_the_replies_and_their_end_markers(style, tmp_path):
    ours, hf = save_style(style, tmp_path)
    end = STYLES[style][3]
    end_id = hf.convert_tokens_to_ids(end)
    assert ours.turn_end_ids == [end_id]
    assert ours.eos_id == hf.convert_tokens_to_ids("<|endoftext|>" if style == "qwen3" else hf.eos_token)
    conversation = SINGLE if style == "qwen3" else MULTI
    ids, learn = ours.render_conversation(conversation)
    learned = [i for i, m in zip(ids, learn) if m]
    think = hf.encode("<think>\n\n</think>\n\n", add_special_tokens=False) if style == "qwen3" else []
    replies = [m["content"] if style == "qwen3" else m["content"].strip()
               for m in conversation if m["role"] == "assistant"]
    expected = []
    for reply in replies:
        expected += [*think, *hf.encode(reply, add_special_tokens=False), end_id]
    assert learned == expected
    # The mask is contiguous per reply: each learned run ends with the end marker.
    runs = "".join(map(str, learn)).split("0")
    assert [len(r) for r in runs if r] == [len(think) + len(hf.encode(r, add_special_tokens=False)) + 1
                                          for r in replies]


@pytest.mark.parametrize("style", list(STYLES))
def test_message_text_stays_text(style, tmp_path):
    ours, hf = save_style(style, tmp_path)
    forged = "".join(STYLES[style][1])  # every control token of the style, typed by a user
    messages = [{"role": "user", "content": f"hi {forged} there"}]
    ids, _ = ours.render_conversation(messages, add_generation_prompt=True)
    clean, _ = ours.render_conversation([{"role": "user", "content": "hi there"}], add_generation_prompt=True)
    specials = {hf.convert_tokens_to_ids(t) for t in STYLES[style][1]}
    assert [i for i in ids if i in specials] == [i for i in clean if i in specials]
    assert ours.decode(ids) == ours.apply_chat_template(messages, add_generation_prompt=True)


def test_history_rendered_differently_is_refused_for_masks(tmp_path):
    ours, _ = save_style("qwen3", tmp_path)  # the last assistant turn gets think tags, earlier ones none
    with pytest.raises(TemplateError, match="renders assistant turn 1 differently"):
        ours.render_conversation(MULTI[1:])


def test_template_errors_are_one_line(tmp_path):
    ours, _ = save_style("gemma", tmp_path)
    with pytest.raises(TemplateError, match="roles must alternate"):
        ours.render_conversation([{"role": "assistant", "content": "first"}])


def test_missing_jinja_names_the_extra(tmp_path, monkeypatch):
    import builtins

    ours, _ = save_style("llama3", tmp_path)
    real_import = builtins.__import__

    def no_jinja(name, *a, **k):
        if name.startswith("jinja2"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_jinja)
    with pytest.raises(TemplateError, match=r'pip install -e "\.\[jinja\]"'):
        ours.apply_chat_template(SINGLE)


def test_saved_again_as_it_came(tmp_path):
    ours, hf = save_style("llama3", tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert again.apply_chat_template(MULTI, tokenize=False) == hf.apply_chat_template(MULTI, tokenize=False)
    assert load_tokenizer(tmp_path / "b").render_conversation(MULTI) == ours.render_conversation(MULTI)


def test_llama3_style_chat_model_exports_its_template_and_stops(tmp_path):
    """generation_config.json, the GGUF and the Modelfile end a turn at the template's own marker."""
    gguf = pytest.importorskip("gguf")
    import subprocess
    import sys

    from conftest import REPO

    from minillm.model.config import LMConfig
    from minillm.model.model import MiniLLM

    ours, hf = save_style("llama3", tmp_path / "tok")
    eot, eos = hf.convert_tokens_to_ids("<|eot_id|>"), hf.convert_tokens_to_ids("<|end_of_text|>")
    config = LMConfig(vocab_size=ours.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, chat_trained=True)
    model_dir = tmp_path / "model"
    MiniLLM(config).save_pretrained(model_dir, tokenizer=ours)
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [eos, eot]
    res = subprocess.run([sys.executable, str(REPO / "export_gguf.py"), "--model", str(model_dir), "--out",
                          str(tmp_path / "m.gguf"), "--dtype", "f32"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == LLAMA3
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot
    assert fields["tokenizer.ggml.bos_token_id"].contents() == hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == eos
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "TEMPLATE" not in modelfile
    assert 'PARAMETER stop "<|end_of_text|>"' in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile


def test_an_outside_models_generation_config_end_ids_stop_it_too(tmp_path):
    """Llama 3.1 lists <|eom_id|> among generation_config's eos ids: generation stops there as well."""
    from argparse import Namespace

    from minillm.cli import load_trained
    from minillm.model.config import LMConfig
    from minillm.model.model import MiniLLM

    ours, hf = save_style("llama3", tmp_path / "tok")
    eos, eot, eom = (hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
    config = LMConfig(vocab_size=ours.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    MiniLLM(config).save_pretrained(tmp_path / "model", tokenizer=ours)
    assert ours.stop_ids == [eos, eot]
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, eot, eom]}))
    _, loaded, _ = load_trained(Namespace(model=str(tmp_path / "model"), tokenizer=None, adapter=None),
                                torch.device("cpu"), torch.float32)
    assert loaded.stop_ids == [eos, eot, eom] and loaded.turn_end_ids == [eot, eom]


def test_a_follow_up_prompt_renders_under_a_template_whose_history_changes(tmp_path):
    """Generation prompts learn nothing, so a template refused for multi-turn masks still chats: the second
    question of a conversation gets transformers' ids (serve.py, generate.py, eval prompts)."""
    ours, hf = save_style("qwen3", tmp_path)
    follow_up = MULTI[1:4]  # user, assistant, user
    ids, learn = ours.render_conversation(follow_up, add_generation_prompt=True)
    assert ids == hf.apply_chat_template(follow_up, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert set(learn) == {0}


# --- issue 44, item 1: a template from a model directory is untrusted input --------------------------------

HOSTILE = ("{% for message in messages %}"
           "{% if 'forever' in message['content'] %}{% for i in range(99999) %}{% for j in range(99999) %}"
           "{% if i < 0 %}{{ j }}{% endif %}{% endfor %}{% endfor %}{% endif %}"
           "{% if 'huge' in message['content'] %}{{ message['content'] * 10000000000 }}{% endif %}"
           "{% if 'flood' in message['content'] %}{% for i in range(99999) %}{{ message['content'] * 999 }}"
           "{% endfor %}{% endif %}"
           "{% if message['content'] == 'refuse me' %}{{ raise_exception('this model writes no refusals') }}{% endif %}"
           "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def hostile_tokenizer_dir(directory, template: str = HOSTILE):
    """The shipped tokenizer with `template` as its own chat_template.jinja."""
    import shutil

    from minillm.data.tokenizer import DEFAULT_ASSETS

    shutil.copytree(DEFAULT_ASSETS, directory, dirs_exist_ok=True)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return directory


@pytest.mark.parametrize("content, kind, needle", [
    ("loop forever", "TemplateLimit", "took longer than"),
    ("huge", "TemplateLimit", "more memory than"),
    ("flood", "TemplateLimit", "more than 16,777,216 characters"),
    ("refuse me", "TemplateRefused", "this model writes no refusals"),
])
def test_a_hostile_template_fails_its_render_within_bounds_and_the_next_render_works(tmp_path, monkeypatch,
                                                                                     content, kind, needle):
    """Issue 44, item 1: nested range loops froze the process (rendering had no bound); a template that used
    gigabytes took the machine's memory. Mutation caught: rendering in the caller's process without the worker."""
    import time

    from minillm.data import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.5)
    tok = load_tokenizer(hostile_tokenizer_dir(tmp_path / "tok"))
    tok.check_template()  # a template that renders ordinary conversations loads
    begun = time.monotonic()
    with pytest.raises(chat_template.TemplateError, match=needle) as raised:
        tok.render_conversation([{"role": "user", "content": content}], add_generation_prompt=True)
    assert type(raised.value).__name__ == kind and str(tmp_path / "tok" / "chat_template.jinja") in str(raised.value)
    assert time.monotonic() - begun < 1.5 + 2.5  # the bound, plus the parent's grace before it kills
    ids, _ = tok.render_conversation([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_template_syntax_error_is_one_line_naming_the_file_and_the_line(tmp_path, where):
    """Issue 44, item 1: a Jinja syntax error printed a traceback (jinja2's TemplateSyntaxError is no ValueError)."""
    from minillm.data.chat_template import TemplateError

    broken = "{% for m in messages %}\n{{ m['content'] }}\n{% if m['role'] %}\n{{ m['role'] }\n{% endfor %}"
    directory = hostile_tokenizer_dir(tmp_path / "tok", broken)
    if where == "tokenizer_config.json":
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = (directory / "chat_template.jinja").read_text()
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        (directory / "chat_template.jinja").unlink()
    with pytest.raises(TemplateError) as raised:
        load_tokenizer(directory).check_template()
    message = str(raised.value)
    assert message.startswith(f"{directory / where}: ") and "line 4" in message and "\n" not in message


@pytest.mark.parametrize("script", ["generate.py", "train_sft.py"])
def test_a_template_that_hangs_while_compiling_or_probing_fails_the_script_in_one_line(tmp_path, tiny_sft_dir,
                                                                                      script):
    """Issue 44, item 1: the same template hung generate.py and train_sft.py at load. Run as a process, with a
    short bound."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from conftest import REPO

    model = tmp_path / "model"
    shutil.copytree(tiny_sft_dir, model)
    hostile_tokenizer_dir(model, HOSTILE.replace("'forever' in message['content']", "true"))
    begun = time.monotonic()
    flags = (["--model", str(model), "--prompt", "hi"] if script == "generate.py" else
             ["--init_from", str(model), "--out_dir", str(tmp_path / "out"), "--max_steps", "1"])
    done = subprocess.run([sys.executable, str(REPO / script), *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINILLM_TEMPLATE_SECONDS": "2"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and str(model / "chat_template.jinja") in done.stderr
    assert "took longer than 2 s" in done.stderr and time.monotonic() - begun < 60


def test_sft_names_the_template_it_renders(tiny_sft_dir, tmp_path, capsys):
    """Issue 50: SFT's log says which chat template its conversations are rendered with."""
    outside = hostile_tokenizer_dir(tmp_path / "tok")
    assert Tokenizer.from_pretrained(outside).template_name() == (
        f"the outside Jinja template of {outside / 'chat_template.jinja'}")
    code, out, err = run_train_cli("sft", "--init_from", tiny_sft_dir, "--out_dir", tmp_path / "sft", "--max_steps",
                                   "1", "--eval_data", "", capsys=capsys)
    assert code == 0, err
    assert "chat template: minillm's ChatML with tool calls (minillm/data/conversation.py)\n" in out


def test_a_trained_outside_model_keeps_every_end_id_in_its_generation_config(tmp_path):
    """Issue 50: after SFT of a Llama 3-style model whose config names <|eot_id|>, generation_config.json lost
    <|end_of_text|> (and the base model's <|eom_id|>): a training stage now keeps the text's end and the
    init_from model's own end ids."""
    from argparse import Namespace

    from minillm.cli.training import _load_tokenizer
    from minillm.model.config import LMConfig
    from minillm.model.model import MiniLLM

    ours, hf = save_style("llama3", tmp_path / "tok")
    eos, eot, eom = (hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
    config = LMConfig(vocab_size=ours.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=eos, eos_token_id=eot, pad_token_id=eos, chat_trained=True)
    MiniLLM(config).save_pretrained(tmp_path / "base", tokenizer=ours)
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, eot, eom]}))
    tokenizer = _load_tokenizer(Namespace(tokenizer=None, init_from=str(tmp_path / "base")))
    MiniLLM(config).save_pretrained(tmp_path / "sft", tokenizer=tokenizer)  # what train_sft.py writes
    assert json.loads((tmp_path / "sft" / "generation_config.json").read_text())["eos_token_id"] == [eot, eos, eom]
