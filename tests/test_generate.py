"""Using a trained model: ``kphi generate``, ``kphi chat``, the library functions behind them, and the
transformers pipeline on a ``kphi train`` model directory."""

import copy

import pytest

from processes import run_cli
import torch
from torch import nn

from kphi.generate import (
    ChatSession,
    GenerationError,
    SamplingSettings,
    context_length,
    encode_prompt,
    generate_reply,
    load_for_generation,
    stop_token_ids,
)

QUESTION = "What is the capital of Peru?"




@pytest.fixture(scope="module")
def model_dir(trained_model_dir):
    return trained_model_dir


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_generation(model_dir)


def greedy(n=12):
    return SamplingSettings(temperature=0, max_new_tokens=n)


def count_forward_calls(model):
    """Wrap ``model.forward``; returns the list of ``input_ids`` each call received."""
    calls = []
    inner = model.forward

    def forward(*args, **kwargs):
        calls.append(kwargs.get("input_ids"))
        return inner(*args, **kwargs)

    model.forward = forward
    return calls


# --------------------------------------------------------------------------- the model directory


def test_train_output_carries_the_chat_template_and_works_in_a_pipeline(model_dir, loaded):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": QUESTION}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<|user|>{QUESTION}<|end|><|assistant|>"

    pipe = pipeline("text-generation", model=str(model_dir))
    out = pipe(messages, max_new_tokens=12, do_sample=False)
    turn = out[0]["generated_text"][-1]
    assert turn["role"] == "assistant"
    # the pipeline (report's way) and kphi's own function give the same greedy reply
    model, tok = loaded
    assert turn["content"].strip() == generate_reply(model, tok, messages, SamplingSettings(temperature=0, max_new_tokens=12))


def test_prompt_is_the_chat_template_with_generation_prompt_and_raw_is_verbatim(loaded):
    _, tokenizer = loaded
    ids = encode_prompt(tokenizer, QUESTION)
    assert tokenizer.decode(ids) == f"<|user|>{QUESTION}<|end|><|assistant|>"
    assert tokenizer.decode(encode_prompt(tokenizer, "plain text", raw=True)) == "plain text"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.decode(encode_prompt(tokenizer, system)) == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"


# --------------------------------------------------------------------------- library behaviour


def test_same_seed_same_reply_and_streamed_text_is_the_reply(loaded):
    model, tokenizer = loaded
    settings = SamplingSettings(seed=11, max_new_tokens=16)
    pieces = []
    first = generate_reply(model, tokenizer, QUESTION, settings, stream=pieces.append)
    second = generate_reply(model, tokenizer, QUESTION, settings)
    assert first == second
    assert "".join(pieces).strip() == first
    assert "<|" not in first  # special tokens are not part of the reply


@pytest.mark.parametrize("stop", ["<|end|>", "<|endoftext|>"])
def test_generation_stops_at_end_of_turn_and_end_of_text(loaded, stop):
    model, tokenizer = loaded
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    assert stop_id in stop_token_ids(tokenizer, model)
    # a copy of the model whose head always prefers `stop`: the reply must end after one token
    forced = copy.deepcopy(model)
    head = nn.Linear(forced.lm_head.in_features, forced.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[stop_id] = 10.0
    forced.lm_head = head
    calls = count_forward_calls(forced)
    reply = generate_reply(forced, tokenizer, QUESTION, SamplingSettings(temperature=0, max_new_tokens=20))
    assert reply == ""
    assert len(calls) == 1  # one forward pass: the first token was the stop token


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_with_a_warning(loaded):
    model, tokenizer = loaded
    context = context_length(model)
    prompt = " ".join(f"word{i}" for i in range(context))  # several tokens per word: far too long
    full = encode_prompt(tokenizer, prompt)
    assert len(full) > context
    warnings = []
    probe = copy.deepcopy(model)
    calls = count_forward_calls(probe)
    generate_reply(probe, tokenizer, prompt, greedy(8), warn=warnings.append)
    kept = calls[0][0].tolist()
    assert len(kept) == context - 8
    assert kept == full[-len(kept):]  # the end of the prompt (with <|assistant|>) survives
    assert len(warnings) == 1 and f"{len(full)} tokens" in warnings[0] and "dropped its first" in warnings[0]


def test_chat_session_keeps_history_and_drops_the_oldest_turns_when_full(loaded):
    model, tokenizer = loaded
    notes = []
    session = ChatSession(model, tokenizer, SamplingSettings(temperature=0, max_new_tokens=8), warn=notes.append)
    long_message = "Name a red thing in Paris, near the river, please. " * 6  # ~250 tokens: 2 turns overflow 512
    for _ in range(3):
        session.ask(long_message)
        prompt = encode_prompt(tokenizer, session.messages())
        assert len(prompt) <= context_length(model)
    assert any("dropped the" in n and "oldest turn" in n for n in notes)
    assert session.history[-2] == {"role": "user", "content": long_message}
    assert [m["role"] for m in session.history] == ["user", "assistant"] * (len(session.history) // 2)
    session.reset()
    assert session.history == []


def test_bad_settings_and_prompts_raise_generation_error(loaded):
    model, tokenizer = loaded
    with pytest.raises(GenerationError, match="empty"):
        generate_reply(model, tokenizer, "   ")
    with pytest.raises(GenerationError, match="top_p"):
        generate_reply(model, tokenizer, QUESTION, SamplingSettings(top_p=0))
    with pytest.raises(GenerationError, match="unknown chat role"):
        generate_reply(model, tokenizer, [{"role": "tool", "content": "x"}])


# --------------------------------------------------------------------------- the command line


def test_generate_command_prints_only_the_reply(model_dir, loaded):
    result = run_cli("generate", str(model_dir), "--prompt", QUESTION, "--seed", "5", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    model, tokenizer = loaded
    expected = generate_reply(model, tokenizer, QUESTION, SamplingSettings(seed=5, max_new_tokens=16))
    assert result.stdout.strip() == expected
    assert "<|" not in result.stdout and QUESTION not in result.stdout


def test_chat_command_reads_a_script_from_stdin(model_dir, loaded):
    script = "Hello there\n/reset\n\nWhat is the capital of Peru?\nAnd of Norway?\n/exit\nnever read\n"
    result = run_cli("chat", str(model_dir), "--temperature", "0", "--max-new-tokens", "10", input=script)
    assert result.returncode == 0, result.stderr
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, greedy(10))
    expected = [session.ask("Hello there")]
    session.reset()
    expected += [session.ask("What is the capital of Peru?"), session.ask("And of Norway?")]
    assert result.stdout == "".join(reply + "\n" for reply in expected)  # replies only, no prompts
    assert "cleared" in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [("not-a-model", "not a model directory"), ("no-tokenizer", "has no tokenizer"), ("empty-prompt", "prompt is empty")],
)
def test_generate_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, case, message):
    target, prompt = model_dir, QUESTION
    if case == "not-a-model":
        target = tmp_path
        (tmp_path / "notes.txt").write_text("not a model")
    elif case == "no-tokenizer":
        target = tmp_path / "weights-only"
        target.mkdir()
        for name in ("config.json", "model.safetensors"):
            (target / name).write_bytes((model_dir / name).read_bytes())
    else:
        prompt = "  "
    result = run_cli("generate", str(target), "--prompt", prompt)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("kphi: error:") and message in result.stderr
    assert result.stdout == ""


def test_sampling_defaults_come_from_the_model_generation_config():
    from transformers import GenerationConfig

    from kphi.generate import REPORT_SAMPLING

    report = SamplingSettings().resolve(GenerationConfig(**REPORT_SAMPLING))
    assert (report.top_p, report.repetition_penalty, report.max_new_tokens, report.do_sample) == (0.5, 1.2, 128, True)
    greedy_model = SamplingSettings().resolve(GenerationConfig(do_sample=False, max_new_tokens=7))
    assert not greedy_model.do_sample and greedy_model.max_new_tokens == 7
    mine = SamplingSettings(top_p=0.9, temperature=0.7).resolve(GenerationConfig(**REPORT_SAMPLING))
    assert (mine.top_p, mine.temperature, mine.repetition_penalty) == (0.9, 0.7, 1.2)


def test_a_greedy_generation_config_makes_replies_greedy(loaded):
    model, tokenizer = loaded
    model = copy.deepcopy(model)
    model.generation_config.do_sample = False
    default = generate_reply(model, tokenizer, QUESTION, SamplingSettings(max_new_tokens=12, seed=1))
    other_seed = generate_reply(model, tokenizer, QUESTION, SamplingSettings(max_new_tokens=12, seed=2))
    assert default == other_seed == generate_reply(model, tokenizer, QUESTION, greedy())
