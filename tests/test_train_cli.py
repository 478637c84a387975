"""train_*.py as a new user meets it: short runs, interrupts, reused out_dirs, flags that would be ignored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARGS, run_train_cli, stage_defaults, tiny_pretrain

from minillm.cli import EXIT_INTERRUPTED, build_parser
from minillm.model.config import LMConfig
from minillm.model.model import MiniLLM
from minillm.train.checkpoint import latest_checkpoint, list_checkpoints


def run(kind, *args, capsys):
    return run_train_cli(kind, *args, capsys=capsys)


def pretrain(out, corpus, *extra, capsys):
    return tiny_pretrain(out, corpus, *extra, capsys=capsys)


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_shorter_than_log_every_without_eval_finishes_and_merges(tmp_path, corpus, capsys):
    """Rough edge 1: no metrics line was ever written, and the end of the run crashed before --merge."""
    code, _, err = pretrain(tmp_path / "base", corpus, "--max_steps", "1", capsys=capsys)
    assert code == 0, err
    out = tmp_path / "lora"
    code, stdout, err = run("pretrain", "--init_from", tmp_path / "base", "--data_path", corpus, "--eval_data", "",
                            "--out_dir", out, "--max_length", "32", "--batch_size", "2", "--max_steps", "2",
                            "--log_every", "10", "--lora", "--merge", capsys=capsys)
    assert code == 0, err
    assert MiniLLM.from_pretrained(out / "merged") is not None
    assert f"merged model in {out / 'merged'}" in stdout
    assert not (out / "loss.png").exists()  # nothing was logged, so there is no curve to draw
    assert (tmp_path / "base" / "loss.png").is_file()  # --log_every 1: one point


def test_loss_curve_is_drawn(tmp_path, corpus, capsys):
    pytest.importorskip("matplotlib")
    code, _, err = pretrain(tmp_path / "run", corpus, "--max_steps", "3", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_launcher_turns_torchrun_interrupt_into_one_line_and_status_3(tmp_path, corpus):
    """Rough edge 3: under torchrun a Ctrl-C ended in the agent's SignalException traceback and status 1."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "minillm.train.launch", "--standalone", "--nproc_per_node=1",
            str(REPO / "train_pretrain.py"), "--data_path", str(corpus), "--eval_data", "", "--out_dir", str(out),
            "--max_length", "32", "--batch_size", "2", "--max_steps", "100000", "--save_every", "0", *TINY_ARGS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C reaches the launcher; it forwards the signal to the workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr and "minillm.train.launch: stopped by SIGINT" in stderr
    assert latest_checkpoint(out) is not None and "--resume" in stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    failed = subprocess.run([*args[:6], "--data_path", str(bad), "--out_dir", str(tmp_path / "o"), *TINY_ARGS],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert f"{bad}:1" in failed.stderr and "minillm.train.launch: worker 0 exited with status 1" in failed.stderr


# Runs the launcher with torchrun's rendezvous heartbeat slowed down, so that the heartbeat thread holds the
# rendezvous handler when the interrupted launcher lets go of it (a race CI once lost by chance).
SLOW_HEARTBEAT = """
import sys, time
from pathlib import Path
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
beat = Path(sys.argv.pop(1))
keep_alive = DynamicRendezvousHandler._keep_alive
def slow_keep_alive(self):
    keep_alive(self)
    beat.touch()  # a heartbeat has started; the test sends Ctrl-C now
    time.sleep(2)
DynamicRendezvousHandler._keep_alive = slow_keep_alive
from minillm.train.launch import main
status = main()
time.sleep(3)  # the heartbeat ends while the launcher is still alive to print what it does then
sys.exit(status)
"""


def test_launcher_interrupted_during_a_rendezvous_heartbeat_prints_no_traceback(tmp_path, corpus):
    """torchrun's heartbeat thread could finalize the rendezvous handler itself and print a traceback."""
    wrapper, beat = tmp_path / "slow_heartbeat.py", tmp_path / "beat"
    wrapper.write_text(SLOW_HEARTBEAT, encoding="utf-8")
    out = tmp_path / "run"
    args = [sys.executable, str(wrapper), str(beat), "--standalone", "--nproc_per_node=1", str(REPO / "train_pretrain.py"),
            "--data_path", str(corpus), "--eval_data", "", "--out_dir", str(out), "--max_length", "32",
            "--batch_size", "2", "--max_steps", "100000", "--save_every", "0", *TINY_ARGS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while time.time() < deadline and not beat.exists():  # torchrun's first heartbeat comes after 5 s
        time.sleep(0.05)
    if not beat.exists():
        proc.kill()
        pytest.fail(f"no heartbeat within 120 s: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "minillm.train.launch: stopped by SIGINT" in stderr
    assert "Traceback" not in stderr and "cannot join current thread" not in stderr, stderr[-2000:]


def test_out_dir_with_an_earlier_run_needs_resume_or_overwrite(tmp_path, corpus, capsys):
    """Rough edge 4: a new run silently mixed into the old checkpoints and appended to its metrics."""
    out = tmp_path / "run"
    assert pretrain(out, corpus, "--max_steps", "4", "--save_every", "2", capsys=capsys)[0] == 0
    code, _, err = pretrain(out, corpus, "--max_steps", "2", capsys=capsys)
    assert code == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert metric_steps(out) == [1, 2, 3, 4]  # untouched
    code, _, err = pretrain(out, corpus, "--max_steps", "2", "--overwrite", capsys=capsys)
    assert code == 0, err
    assert metric_steps(out) == [1, 2] and [p.name for p in list_checkpoints(out)] == ["step_00000002"]


def test_eval_ppl_defaults_to_the_trained_context(tmp_path, corpus, capsys):
    """Rough edge 5: eval_ppl.py windows defaulted to 512 whatever the model was trained on."""
    out = tmp_path / "run"
    assert pretrain(out, corpus, "--max_steps", "2", capsys=capsys)[0] == 0
    assert MiniLLM.from_pretrained(out).config.trained_context == 32
    report = tmp_path / "ppl.json"
    res = subprocess.run([sys.executable, str(REPO / "eval_ppl.py"), "--model", str(out), "--data", str(corpus),
                          "--json", str(report)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    got = json.loads(report.read_text())
    assert got["max_length"] == 32 and got["max_length_from"] == "the model's training context"
    assert "max_length 32 (the model's training context)" in res.stdout


def test_shape_flags_that_disagree_with_init_from_are_an_error(tmp_path, corpus, capsys):
    """Rough edge 6: --init_from X --hidden_size N silently ignored the size flags."""
    base = tmp_path / "base"
    assert pretrain(base, corpus, "--max_steps", "1", capsys=capsys)[0] == 0
    sft = REPO / "dataset" / "sft.jsonl"
    common = ["--init_from", base, "--data_path", sft, "--eval_data", "", "--max_length", "32", "--max_steps", "1",
              "--batch_size", "2"]
    code, _, err = run("sft", *common, "--out_dir", tmp_path / "a", "--hidden_size", "128", "--dropout", "0.1",
                       capsys=capsys)
    assert code == 1 and "--hidden_size 128 (the model has 64)" in err and "--dropout 0.1 (the model has 0.0)" in err
    assert "new model only" in err and not (tmp_path / "a").exists()
    code, _, err = run("sft", *common, "--out_dir", tmp_path / "b", "--hidden_size", "64", capsys=capsys)
    assert code == 0, err  # a value that agrees is fine
    # transformers stops a chat model's generate at <|im_end|> too; a pretrained one at <|endoftext|> only.
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 0
    with pytest.raises(SystemExit):
        run("sft", "--help", capsys=capsys)
    assert "New model only" in capsys.readouterr().out


def test_a_stage_default_shape_builds_the_new_model_and_leaves_init_from_alone(tmp_path, corpus, capsys):
    """train_pretrain.py's DEFAULTS may name a model shape: it builds a new model, and is not checked on --init_from."""
    from minillm.cli import main

    shape = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3)
    defaults = dict(stage_defaults("pretrain"), **shape)
    common = ["--data_path", corpus, "--eval_data", "", "--max_length", "32", "--batch_size", "2", "--max_steps", "1"]
    assert main("pretrain", defaults, [*map(str, common), "--out_dir", str(tmp_path / "new")]) == 0
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert {k: config[k] for k in shape} == shape
    assert "(default: 96)" in " ".join(build_parser("pretrain", defaults).format_help().split())
    # A loaded model of another shape continues under the same defaults: only typed flags must agree with it.
    assert pretrain(tmp_path / "base", corpus, "--max_steps", "1", capsys=capsys)[0] == 0
    code = main("pretrain", defaults, [*map(str, common), "--init_from", str(tmp_path / "base"),
                                       "--out_dir", str(tmp_path / "cont")])
    assert code == 0 and json.loads((tmp_path / "cont" / "config.json").read_text())["hidden_size"] == 64


def test_warmup_longer_than_the_run_is_scaled_so_the_peak_is_reached(tmp_path, corpus, capsys):
    """Rough edge 7: --max_steps 30 with (then default) 50 warmup steps never reached the peak learning rate."""
    out = tmp_path / "run"
    code, _, err = pretrain(out, corpus, "--max_steps", "30", "--learning_rate", "1e-3", "--warmup_steps", "50",
                            capsys=capsys)
    assert code == 0, err
    assert "--warmup_steps 50 >= the run's 30 steps" in err and "warming up for 3 steps" in err
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(lrs) == pytest.approx(1e-3) and lrs[0] == 0.0 and lrs[-1] == pytest.approx(1e-4)


def test_generate_hints_raw_for_a_model_never_tuned_on_chat(tmp_path, tokenizer):
    """Rough edge 8: generate.py chatted with a pretrain-only model without a word."""
    def save(name, chat_trained):
        config = LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, chat_trained=chat_trained)
        MiniLLM(config).save_pretrained(tmp_path / name, tokenizer=tokenizer)
        res = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(tmp_path / name),
                              "--prompt", "春", "--max_new_tokens", "2", "--seed", "0"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, res.stderr
        return res.stderr

    assert "never fine-tuned on chat" in save("pretrained", False) and "--raw" in save("pretrained", False)
    assert "never fine-tuned" not in save("sft", True)
    assert "never fine-tuned" not in save("unknown", None)  # not recorded (e.g. a Hugging Face model)


def test_resume_summary_separates_total_steps_from_this_session(tmp_path, corpus, capsys):
    """Rough edge 9: "23 steps, 24,480 tokens" mixed all steps with this session's tokens."""
    out = tmp_path / "run"
    assert pretrain(out, corpus, "--max_steps", "3", "--save_every", "3", capsys=capsys)[0] == 0
    code, stdout, err = pretrain(out, corpus, "--max_steps", "5", "--resume", capsys=capsys)
    assert code == 0, err
    # 2 steps of 2 x 31 input positions in this session.
    assert "done: 5 steps (2 steps, 124 tokens in" in stdout and "in this session)" in stdout
    assert metric_steps(out) == [1, 2, 3, 4, 5]


def test_newcomer_lines_name_the_start_the_schedule_and_the_missing_curve(tmp_path, corpus, capsys):
    """Issue 27: which model SFT starts from; why there is no loss.png; what --resume --max_steps does."""
    base = tmp_path / "base"
    code, out, err = pretrain(base, corpus, "--max_steps", "2", "--log_every", "5", capsys=capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("pretrain: a new model, ")
    assert "no loss.png: metrics.jsonl holds no loss yet (the run took fewer steps than --log_every" in out
    code, out, err = run("sft", "--init_from", base, "--data_path", REPO / "dataset" / "sft.jsonl", "--eval_data", "",
                         "--out_dir", tmp_path / "sft", "--max_length", "32", "--batch_size", "2", "--max_steps", "1",
                         capsys=capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"sft: from {base}, ")
    run_dir = tmp_path / "long"
    assert pretrain(run_dir, corpus, "--max_steps", "2", "--save_every", "1", capsys=capsys)[0] == 0
    code, out, err = pretrain(run_dir, corpus, "--max_steps", "4", "--resume", capsys=capsys)
    assert code == 0, err
    assert "max_steps 2 -> 4" in out and "the learning-rate schedule is refitted to the new settings" in out
    assert "step 2 continues at the rate the new schedule gives it" in out


def test_metrics_without_a_checkpoint_is_not_a_run_to_protect(tmp_path, corpus, capsys):
    """Issue 27: a run interrupted before its first checkpoint left metrics.jsonl, and the re-run was refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n', encoding="utf-8")
    code, stdout, err = pretrain(out, corpus, "--max_steps", "2", capsys=capsys)
    assert code == 0, err
    assert f"note: {out} holds metrics.jsonl but no checkpoint or model" in stdout
    assert metric_steps(out) == [1, 2] and json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] != 9.0
    # A finished model is a run to protect, even without checkpoints.
    for p in list_checkpoints(out):
        import shutil

        shutil.rmtree(p)
    code, _, err = pretrain(out, corpus, "--max_steps", "2", capsys=capsys)
    assert code == 1 and "already holds a run (metrics.jsonl)" in err


def test_ctrl_c_with_the_output_piped_to_a_reader_that_has_exited_still_saves(tmp_path, corpus):
    """Issue 26, item 18: `train_pretrain.py 2>&1 | tee log`, Ctrl-C: tee dies too, the next progress line hit
    a pipe with no reader, and the run ended without its checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_pretrain.py"), "--data_path", str(corpus),
                             "--eval_data", "", "--out_dir", str(out), "--max_length", "32", "--batch_size", "2",
                             "--max_steps", "100000", "--save_every", "0", "--log_every", "1", *TINY_ARGS],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.stdout.close()  # the reader (tee) is gone
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED
    saved = latest_checkpoint(out)
    assert saved is not None and int(saved.name.split("_")[1]) >= 1
    assert int(saved.name.split("_")[1]) == metric_steps(out)[-1]  # the checkpoint is of the last step logged


@pytest.mark.parametrize("script, flags", [
    ("train_pretrain.py", ["--no_such_flag"]),
    ("train_pretrain.py", ["--batch_size", "many"]),
    ("train_sft.py", ["--dtype", "fp8"]),
    ("eval_ppl.py", ["--model", "x", "--stride", "wide"]),
    ("generate.py", ["--model", "x", "--temperature", "hot"]),
    ("export_gguf.py", ["--model", "x", "--dtype", "q4"]),
])
def test_bad_flags_exit_with_status_2(script, flags):
    """Issue 32, item 9: README promises status 2 for bad flags; no test asserted it."""
    res = subprocess.run([sys.executable, str(REPO / script), *flags], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "error:" in res.stderr, res.stderr
