"""generate.py and minillm.infer.chat on a tiny model trained for a few steps on the shipped SFT data."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from minillm.data.tokenizer import load_tokenizer
from minillm.infer.chat import (
    REPLACEMENT,
    ChatSession,
    ContextError,
    StreamDecoder,
    StreamingAnswer,
    stream_decode,
)
from minillm.infer.generation import generate
from minillm.model.model import MiniLLM

ROOT = Path(__file__).resolve().parent.parent
SPEED_LINE = re.compile(r"^\[(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s(, cut at --max_new_tokens \d+)?\]$", re.M)


cli = load_script("generate.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the model is tiny, and on a busy 2-core machine two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tiny_sft_dir):
    return tiny_sft_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return MiniLLM.from_pretrained(model_dir).eval()


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env=env, timeout=120)


def reference_answer(model, tok, prompt_ids, max_new_tokens, **sampling):
    """The answer text from one non-streaming generate() call, cut before the first stop token."""
    out = generate(model, prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=[tok.eos_id, tok.im_end_id],
                   **sampling)[0, len(prompt_ids):].tolist()
    for i, t in enumerate(out):
        if t in (tok.eos_id, tok.im_end_id):
            out = out[:i]
            break
    return tok.decode(out)


def chat_ids(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True), allow_special=True)


# --- streaming text ---------------------------------------------------------------------------------------

def test_stream_decoder_never_splits_a_character(tok):
    text = "续写这首词：😀𠀀é中文続け。"
    ids = tok.encode(text)
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)  # some characters really span several tokens
    decoder = StreamDecoder(tok)
    pieces = []
    for i in ids:
        pieces.append(decoder.push(i))
        assert text.startswith("".join(pieces))
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    assert pieces.count("") >= 3  # the 4-byte emoji and the CJK Extension B character were held back


def test_stream_decode_equals_decode_on_arbitrary_ids(tok):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
        assert "".join(stream_decode(tok, ids)) == tok.decode(ids)
    # A truncated character at the very end comes out as U+FFFD on flush, like decode() does.
    ids = tok.encode("好😀")[:-1]
    assert "".join(stream_decode(tok, ids)) == tok.decode(ids) == "好" + REPLACEMENT


def test_stream_decoder_costs_the_same_per_id_however_long_the_answer(tok, monkeypatch):
    """Issue 30: each push decoded the whole answer so far (quadratic in its length); now a short window."""
    decoded = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    text = "春风又绿江南岸，明月何时照我还。😀" * 40
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert max(decoded[:-1]) <= 8  # every push decodes a window of a few ids (the last call is flush's)
    assert sum(decoded) < 10 * len(ids)


def test_stream_decoder_keeps_a_leading_space_decoder_exact():
    """A SentencePiece-style decoder drops the space of the first token it decodes: windows keep context."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "▁sat": 3, "s": 4, "▁on": 5, "▁mat": 6}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()

    class Wrapped:
        def decode(self, ids, skip_special_tokens=False):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = [1, 2, 4, 3, 5, 1, 6]
    assert backend.decode([2]) == "cat"  # decoded alone, the space is gone
    decoder = StreamDecoder(Wrapped())
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == backend.decode(ids) == "the cats sat on the mat"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)])
def test_streaming_answer_equals_non_streaming_generate(model, tok, sampling):
    ids = chat_ids(tok, "写一首关于江的词。")
    seed = sampling.pop("seed", None)
    rng = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    answer = StreamingAnswer(model, tok, ids, 40, generator=rng(), **sampling)
    pieces = list(answer)
    expected = reference_answer(model, tok, ids, 40, generator=rng(), **sampling)
    assert "".join(pieces) == answer.text == expected
    assert len(expected) > 5
    assert answer.generated == len(answer.token_ids) + answer.stopped


# --- ChatSession ------------------------------------------------------------------------------------------

def test_chat_session_history_renders_exactly(tok):
    s = ChatSession(tok, budget=200, system="你是词人。")
    assert s.add_user("first question") == 0
    s.add_assistant("first answer")
    s.reset()
    s.add_user("江")
    s.add_assistant("望江南")
    s.add_user("再来一首")
    expected = ("<|im_start|>system\n你是词人。<|im_end|>\n"
                "<|im_start|>user\n江<|im_end|>\n"
                "<|im_start|>assistant\n望江南<|im_end|>\n"
                "<|im_start|>user\n再来一首<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert s.render(add_generation_prompt=True) == expected
    assert s.prompt_ids() == tok.encode(expected, allow_special=True)


def test_chat_session_drops_oldest_turns_to_fit(tok):
    turns = [(f"问题{i}：江南好", f"回答{i}：风景旧曾谙") for i in range(6)]
    full = ChatSession(tok, budget=10_000, system="sys")
    for q, a in turns:
        full.add_user(q)
        full.add_assistant(a)
    per_turn = (len(full.prompt_ids()) - len(ChatSession(tok, 10_000, "sys").encode())) // 6
    budget = len(full.prompt_ids()) - 2 * per_turn  # room for the system prompt and about four turns

    s = ChatSession(tok, budget=budget, system="sys")
    dropped = []
    for q, a in turns:
        dropped.append(s.add_user(q))
        assert len(s.prompt_ids()) <= budget
        s.add_assistant(a)
    dropped.append(s.add_user("最后一问"))
    assert s.messages[0] == {"role": "system", "content": "sys"}
    kept = [m["content"] for m in s.messages[1:]]
    n_turns = (len(kept) - 1) // 2
    assert 2 <= n_turns <= 4
    # The kept history is the longest suffix of whole turns that fits, the new question included.
    assert kept == [c for q, a in turns[6 - n_turns:] for c in (q, a)] + ["最后一问"]
    assert len(s.prompt_ids()) <= budget
    one_more = [{"role": "system", "content": "sys"}] + [
        {"role": r, "content": c} for q, a in turns[5 - n_turns:] for r, c in (("user", q), ("assistant", a))]
    assert len(s.encode(one_more + [{"role": "user", "content": "最后一问"}])) > budget
    assert dropped[:3] == [0, 0, 0]  # nothing is dropped while everything fits
    assert sum(dropped) == 6 - n_turns  # every turn not kept was dropped exactly once


def test_chat_session_rejects_a_message_that_cannot_fit(tok):
    s = ChatSession(tok, budget=30)
    s.add_user("你好")
    s.add_assistant("好")
    before = list(s.messages)
    with pytest.raises(ContextError, match="only 30 fit"):
        s.add_user("长" * 100)
    assert s.messages == before


# --- the CLI ----------------------------------------------------------------------------------------------

def test_cli_seeded_sampling_is_reproducible(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "写一首关于江的词。", "--temperature", "1.0", "--top_p", "0.95",
            "--max_new_tokens", "24"]
    # The same seed gives the same text in a separate process and in this one; another seed differs.
    a = run_cli(*args, "--seed", "7")
    assert a.returncode == 0, a.stderr
    assert SPEED_LINE.search(a.stderr)
    outs = []
    for seed in ("7", "8"):
        assert cli.main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert a.stdout == outs[0] != outs[1]
    assert len(a.stdout.strip()) > 3


@pytest.mark.parametrize("raw", [False, True])
def test_cli_greedy_equals_generate(model_dir, model, tok, capsys, raw):
    prompt = "江南好，" if raw else "请以《浣溪沙》为词牌写一首词"
    flags = ["--raw"] if raw else []
    assert cli.main(["--model", str(model_dir), "--prompt", prompt, "--temperature", "0",
                     "--max_new_tokens", "30", *flags]) == 0
    out, err = capsys.readouterr()
    ids = tok.encode(prompt) if raw else chat_ids(tok, prompt)
    expected = reference_answer(model, tok, ids, 30, temperature=0)
    assert len(expected) > 5
    assert out == expected + "\n"
    n = int(SPEED_LINE.search(err).group(1))
    assert 1 <= n <= 30


def test_cli_interactive_chat_through_stdin(model_dir, model, tok):
    lines = ["first question", "/reset", "写一首关于江的词。", "再来一首", "/exit", "never answered"]
    result = run_cli("--model", model_dir, "--temperature", "0", "--max_new_tokens", "20",
                     "--system", "你是词人。", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr

    # The same conversation driven directly: /reset forgets "first question" and its answer.
    session = ChatSession(tok, budget=256 - 20, system="你是词人。")
    answers = []
    for line in lines[:4]:
        if line == "/reset":
            session.reset()
            continue
        session.add_user(line)
        answers.append(reference_answer(model, tok, session.prompt_ids(), 20, temperature=0))
        session.add_assistant(answers[-1])
    assert result.stdout == "".join(a + "\n" for a in answers)
    assert session.render() == ("<|im_start|>system\n你是词人。<|im_end|>\n"
                                "<|im_start|>user\n写一首关于江的词。<|im_end|>\n"
                                f"<|im_start|>assistant\n{answers[1]}<|im_end|>\n"
                                "<|im_start|>user\n再来一首<|im_end|>\n"
                                f"<|im_start|>assistant\n{answers[2]}<|im_end|>\n")
    assert "(history cleared)" in result.stderr
    assert len(SPEED_LINE.findall(result.stderr)) == 3


def test_cli_interactive_ends_at_eof_and_trims_history(model_dir, monkeypatch, capsys):
    # --context 60 with 20 new tokens leaves 40 for the prompt: room for one question (28 tokens), not two.
    assert len(chat_ids(load_tokenizer(), "写一首关于江的词。")) == 28
    monkeypatch.setattr(sys, "stdin", io.StringIO("写一首关于江的词。\n写一首关于江的词。\n"))  # no /exit: EOF ends it
    assert cli.main(["--model", str(model_dir), "--temperature", "0", "--max_new_tokens", "20",
                     "--context", "60"]) == 0
    err = capsys.readouterr().err
    assert "(dropped the oldest 1 turn to keep the conversation within the context)" in err
    assert len(SPEED_LINE.findall(err)) == 2


def _error(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("generate.py: error: ")
    return err


def test_cli_bad_input(model_dir, tmp_path, capsys):
    err = _error(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert f"model directory {tmp_path / 'nope'} does not exist" in err

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    err = _error(capsys, ["--model", str(bare), "--prompt", "hi"])
    assert f"{bare} has no tokenizer.json beside the weights; pass --tokenizer DIR" in err
    assert cli.main(["--model", str(bare), "--tokenizer", "default", "--prompt", "hi", "--max_new_tokens", "2"]) == 0
    capsys.readouterr()

    n = len(chat_ids(load_tokenizer(), "长" * 300))
    assert n > 224
    err = _error(capsys, ["--model", str(model_dir), "--prompt", "长" * 300, "--max_new_tokens", "32"])
    assert (f"the prompt is {n} tokens, but the context of 256 tokens leaves 224 for it after reserving "
            "--max_new_tokens 32; shorten the prompt or lower --max_new_tokens") in err

    err = _error(capsys, ["--model", str(model_dir), "--max_new_tokens", "256"])
    assert "--max_new_tokens 256 leaves no room for a prompt in the context of 256 tokens" in err
    err = _error(capsys, ["--model", str(model_dir), "--raw", "--system", "x", "--prompt", "hi"])
    assert "--system needs the chat template" in err


def test_context_defaults_to_the_trained_one_and_the_answer_to_half_of_it(model_dir, tmp_path, capsys):
    short = tmp_path / "short"
    shutil.copytree(model_dir, short)
    config = json.loads((short / "config.json").read_text())
    config.setdefault("minillm", {})["trained_context"] = 64  # serve.py's rule: the context it was trained on
    (short / "config.json").write_text(json.dumps(config))
    n = len(chat_ids(load_tokenizer(), "长" * 40))
    err = _error(capsys, ["--model", str(short), "--prompt", "长" * 40])
    assert (f"the prompt is {n} tokens, but the context of 64 tokens leaves 32 for it after reserving "
            "--max_new_tokens 32") in err
    assert cli.main(["--model", str(short), "--prompt", "长" * 40, "--context", "256", "--temperature", "0"]) == 0
    assert SPEED_LINE.search(capsys.readouterr().err)
    err = _error(capsys, ["--model", str(short), "--prompt", "hi", "--threads", "0"])
    assert "--threads must be >= 1, got 0" in err


def test_cli_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--raw", "--system", "--temperature", "--top_k", "--top_p",
                 "--repetition_penalty", "--max_new_tokens", "--seed", "--device", "--dtype", "--tokenizer",
                 "--context", "/reset", "/exit", "0 is greedy"):
        assert flag in out


def test_cli_hints_at_raw_when_the_tokenizer_has_no_chat_template(model_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "tokenizer_config.json").unlink()
    assert cli.main(["--model", str(plain), "--prompt", "江", "--max_new_tokens", "2", "--seed", "0"]) == 0
    assert "declares no chat template; for a pretrained-only model, --raw continues plain text" in \
        capsys.readouterr().err
    assert cli.main(["--model", str(model_dir), "--prompt", "江", "--max_new_tokens", "2", "--seed", "0"]) == 0
    assert "chat template" not in capsys.readouterr().err
    # transformers' current layout keeps the template in chat_template.jinja (issue 31: SmolLM2-Instruct does)
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert cli.main(["--model", str(plain), "--prompt", "江", "--max_new_tokens", "2", "--seed", "0"]) == 0
    assert "chat template" not in capsys.readouterr().err


def test_cli_default_dtype_is_float32_on_any_cpu(model_dir, model, tok, capsys, monkeypatch):
    """Greedy text does not change with the CPU: auto is float32 on CPUs even with native bf16 units."""
    from minillm.device import inference_dtype

    monkeypatch.setenv("MINILLM_NATIVE_BF16", "1")
    cpu = torch.device("cpu")
    assert inference_dtype("auto", cpu) == torch.float32 and inference_dtype("bfloat16", cpu) == torch.bfloat16
    prompt = "请以《浣溪沙》为词牌写一首词"
    assert cli.main(["--model", str(model_dir), "--prompt", prompt, "--temperature", "0",
                     "--max_new_tokens", "30"]) == 0
    out, _ = capsys.readouterr()
    assert out == reference_answer(model, tok, chat_ids(tok, prompt), 30, temperature=0) + "\n"


@pytest.fixture(scope="module")
def draft_dir(model, tok, tmp_path_factory):
    """A smaller random model with the shipped tokenizer: a draft for model_dir."""
    from minillm.model.config import LMConfig

    config = LMConfig(vocab_size=model.config.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=model.config.max_position_embeddings)
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("draft")
    MiniLLM(config).save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.mark.parametrize("drafter", ["draft", "self", "lookup"])
def test_speculative_decoding_gives_the_models_own_greedy_answer(model_dir, model, tok, draft_dir, capsys, drafter):
    """Issue 49: --draft_model and --prompt_lookup change the speed, never the greedy text."""
    flags = {"draft": ["--draft_model", draft_dir], "self": ["--draft_model", model_dir],
             "lookup": ["--prompt_lookup"]}[drafter]
    prompt = "请以《浣溪沙》为词牌写一首词"
    assert cli.main(["--model", str(model_dir), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "30",
                     "--num_draft_tokens", "3", *map(str, flags)]) == 0
    out, err = capsys.readouterr()
    assert out == reference_answer(model, tok, chat_ids(tok, prompt), 30, temperature=0) + "\n"
    kept = re.search(r", (\d+)% of (\d+) drafted tokens kept\]$", err, re.M)
    assert kept and int(kept.group(2)) > 0
    if drafter == "self":  # the model drafting for itself: every draft kept, and a warning that it is no faster
        assert kept.group(1) == "100" and "warning: the draft" in err


def test_speculative_decoding_bad_input(model_dir, draft_dir, tmp_path, capsys):
    from minillm.data.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(draft_dir, other)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"别的词表 {i}"}, ensure_ascii=False) + "\n" for i in range(50)))
    train_tokenizer([corpus], vocab_size=300).save_pretrained(other)
    base = ["--model", str(model_dir), "--prompt", "hi"]
    err = _error(capsys, [*base, "--draft_model", str(other)])
    assert f"--draft_model {other} has another tokenizer (" in err and f"than {model_dir} (" in err
    assert "--num_draft_tokens must be >= 1, got 0" in _error(capsys, [*base, "--prompt_lookup", "--num_draft_tokens", "0"])
    assert "choose one" in _error(capsys, [*base, "--prompt_lookup", "--draft_model", str(draft_dir)])
    assert "no such model directory" in _error(capsys, [*base, "--draft_model", str(tmp_path / "none")])
    assert "must be less than the context" in _error(capsys, [*base, "--prompt_lookup", "--num_draft_tokens", "999"])
    assert "does not combine with --tools" in _error(capsys, [*base, "--prompt_lookup", "--tools", "all"])
