"""Text around the engine, on a checkpoint laid out like the Hub's Mixtral-8x7B-Instruct-v0.1 (the
`realistic_checkpoint` fixture: the real Mixtral sentencepiece tokenizer, its Instruct chat template, the Hub's
config/generation/tokenizer files). The checkpoint's files are the truth: ids are checked against
sentencepiece, transformers' tokenizer on the same files and mistral-common's v1 instruct encoding."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrt.artifacts import carry_tokenizer
from moetrt.errors import MoetrtError
from moetrt.model.config import PRESETS
from moetrt.model.tokenizer import Tokenizer
from moetrt.names import TEXT_FILES, TOKENIZER, TOKENIZER_CONFIG
from moetrt.runtime.generation_config import GenerationDefaults
from moetrt.runtime.sampling import SamplingParams, sample
from moetrt.runtime.stops import StopMatcher
from moetrt.runtime.textgen import run_generate

# Prompts that trip tokenizers: leading/double spaces, accents, CJK, emoji (byte fallback), digits, newlines,
# the Instruct markers as plain text, and typed special tokens.
CORPUS = [
    "The capital of France is",
    " Hello",
    "  two  spaces ",
    "[INST] What is 2+2? [/INST]",
    "héllo wörld, naïve café — Zürich",
    "日本語のテキストと中文",
    "emoji 🚀🎉 and a flag 🇫🇷",
    "tabs\tand\nnewlines\n\n",
    "1234567 89.5 + 3e-4",
    "ﬁ ligature Ⅻ and \u00a0nbsp",
    "",
]
TYPED_SPECIALS = ["a</s>b <s> c", "<s>[INST] hi [/INST]"]


@pytest.fixture(scope="module")
def tok(realistic_checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(realistic_checkpoint)


@pytest.fixture(scope="module")
def hf_tok(realistic_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(realistic_checkpoint)


def text_copy(checkpoint, directory, drop=(), **tokenizer_config):
    """The checkpoint's text files (and config.json) in `directory`, tokenizer_config.json fields replaced."""
    directory.mkdir()
    for name in (*TEXT_FILES, "config.json"):
        if (checkpoint / name).is_file() and name not in drop:
            shutil.copyfile(checkpoint / name, directory / name)
    if tokenizer_config:
        config = json.loads((checkpoint / TOKENIZER_CONFIG).read_text())
        (directory / TOKENIZER_CONFIG).write_text(json.dumps({**config, **tokenizer_config}))
    return directory


# --- the fixture's tokenizer is the real one -------------------------------------------------------------------
def test_fixture_ids_equal_sentencepiece_and_transformers(realistic_checkpoint, tok, hf_tok):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(realistic_checkpoint / "tokenizer.model"))
    assert sp.get_piece_size() == tok.vocab_size == 32000
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == [1, *sp.encode(text)], text
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == sp.decode(sp.encode(text)) == hf_tok.decode(ids, skip_special_tokens=True)
    # The space before a word is the leading "▁" of its piece, and a lone leading space is its own "▁" (28705).
    assert tok.encode(" Hello") == [1, 28705, 22557]


def test_typed_special_tokens_are_parsed_as_transformers_does(tok, hf_tok):
    """Special-token text typed in a prompt becomes that token (transformers' default, split_special_tokens=False)."""
    for text in TYPED_SPECIALS:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
    assert tok.encode("a</s>b")[2] == tok.eos_token_id == 2
    assert tok.encode("<s>x", add_bos=False)[0] == tok.bos_token_id == 1


# --- BOS / EOS from the checkpoint (fault 3) --------------------------------------------------------------------
def test_bos_rules_follow_tokenizer_config(realistic_checkpoint, tmp_path):
    """add_bos_token / add_eos_token in tokenizer_config.json decide, as in transformers 4's LlamaTokenizerFast,
    the slow LlamaTokenizer and llama.cpp. transformers 5.24 applies them only when passed to from_pretrained
    (from the file alone it keeps tokenizer.json's "<s> $A"), so it is compared with the file's flags passed."""
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(realistic_checkpoint / "tokenizer.model"))
    no_bos = text_copy(realistic_checkpoint, tmp_path / "no_bos", add_bos_token=False)
    with_eos = text_copy(realistic_checkpoint, tmp_path / "with_eos", add_eos_token=True)
    for directory, bos, eos in ((no_bos, False, False), (with_eos, True, True)):
        ours = Tokenizer.from_dir(directory)
        theirs = AutoTokenizer.from_pretrained(directory, add_bos_token=bos, add_eos_token=eos)
        assert (ours.add_bos_token, ours.add_eos_token) == (bos, eos)
        for text in CORPUS[:5]:
            expected = [1] * bos + sp.encode(text) + [2] * eos
            assert ours.encode(text) == expected == theirs(text)["input_ids"], (directory.name, text)
    # A chat is encoded as transformers' apply_chat_template does: the template's tokens only, no EOS appended.
    assert Tokenizer.from_dir(with_eos).encode_chat(USER) == mistral_v1(USER)
    ours = Tokenizer.from_dir(no_bos)
    assert ours.encode("Hi", add_bos=True)[0] == 1 and ours.encode("Hi")[0] != 1  # --bos overrides the file
    assert Tokenizer.from_dir(realistic_checkpoint).encode("Hi", add_bos=False)[0] != 1  # --no-bos


def test_without_tokenizer_config_the_post_processor_decides(realistic_checkpoint, tmp_path):
    """No tokenizer_config.json: tokenizer.json's post-processor ("<s> $A") adds BOS, as transformers' fast
    tokenizer does; the special tokens come from special_tokens_map.json."""
    bare = text_copy(realistic_checkpoint, tmp_path / "bare", drop=(TOKENIZER_CONFIG,))
    tok = Tokenizer.from_dir(bare)
    assert tok.add_bos_token and not tok.add_eos_token and tok.eos_token_id == 2
    assert tok.encode("Hi")[0] == 1


def test_only_tokenizer_model(realistic_checkpoint, tmp_path):
    """A checkpoint without tokenizer.json reads tokenizer.model (converted as the Hub's tokenizer.json is)."""
    import sentencepiece

    only = text_copy(realistic_checkpoint, tmp_path / "spm", drop=(TOKENIZER,))
    tok = Tokenizer.from_dir(only)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(only / "tokenizer.model"))
    for text in CORPUS:
        assert tok.encode(text) == [1, *sp.encode(text)], text
    (only / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(MoetrtError, match=r"tokenizer.model: not a sentencepiece model"):
        Tokenizer.from_dir(only)


# --- chat template ----------------------------------------------------------------------------------------------
def mistral_v1(messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


USER = [{"role": "user", "content": "What is 2+2? Answer in français, s'il vous plaît 🙂"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *USER]
MULTI = [*USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def test_chat_ids_equal_transformers_and_mistral_common(tok, hf_tok):
    ids = tok.encode_chat(USER)
    assert ids == hf_tok.apply_chat_template(USER, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == mistral_v1(USER)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, no second one
    assert tok.encode_chat(MULTI) == hf_tok.apply_chat_template(MULTI, tokenize=True)["input_ids"]
    # On an assistant turn the Hub template writes "[/INST]4</s>" where mistral-common encodes "[/INST] 4</s>":
    # the two differ by exactly that "▁" (28705), a known difference of the Hub template, not of moetrt.
    ours, theirs = tok.encode_chat(MULTI), mistral_v1(MULTI)
    cut = ours.index(2)
    assert theirs == [*ours[: cut - 1], 28705, *ours[cut - 1 :]]


def test_system_message_is_folded_into_the_first_user_turn(tok, hf_tok):
    """Mixtral-Instruct's template refuses a system role; moetrt folds it as mistral-common's v1 encoding does."""
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError):
        hf_tok.apply_chat_template(SYSTEM, tokenize=False)
    assert tok.render_chat(SYSTEM) == "<s>[INST] Be brief.\n\n" + USER[0]["content"] + " [/INST]"
    assert tok.encode_chat(SYSTEM) == mistral_v1(SYSTEM)


def test_chat_template_refusals_are_one_line(tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(
        MoetrtError, match=r"^the chat template refused the messages: Conversation roles must alternate"
    ):
        tok.encode_chat(bad)
    with pytest.raises(MoetrtError, match=r"messages\[0\]: expected an object whose 'role' is one of"):
        tok.encode_chat([{"role": "tool", "content": "x"}])
    without = copy.copy(tok)
    without.chat_template = None
    with pytest.raises(MoetrtError, match="no chat_template"):
        without.encode_chat(USER)


def test_messages_file_errors_are_one_line(tmp_path):
    path = tmp_path / "messages.json"
    for content, message in (
        ('{"messages": [{"role": "user"}]}', r"messages.json: messages\[0\]: expected a string 'content'"),
        ("[]", "messages.json: messages: expected a non-empty list"),
        ("[{", "messages.json: not valid JSON"),
    ):
        path.write_text(content)
        with pytest.raises(MoetrtError, match=message):
            run_generate(tmp_path, messages_file=path)
    with pytest.raises(MoetrtError, match="not both"):
        run_generate(tmp_path, chat="hi", messages_file=path)


def test_chat_template_sandbox(tok):
    """Templates are untrusted: the sandbox refuses attribute tricks (as in transformers)."""
    evil = copy.copy(tok)
    evil.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|access to attribute"):
        evil.render_chat(USER)


def test_chat_template_sources(realistic_checkpoint, tmp_path):
    """chat_template.jinja wins over tokenizer_config.json's (as in transformers); a list of named templates
    gives its "default"; a malformed template is one line."""
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ messages[0].content }}!"}]
    listed = text_copy(realistic_checkpoint, tmp_path / "listed", chat_template=named)
    assert Tokenizer.from_dir(listed).render_chat(USER) == USER[0]["content"] + "!"
    (listed / "chat_template.jinja").write_text("{{ bos_token }}{{ messages | length }}")
    assert Tokenizer.from_dir(listed).render_chat(MULTI) == "<s>3"
    (listed / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(MoetrtError, match=r"^chat_template: not a valid Jinja2 template \(line 1: "):
        Tokenizer.from_dir(listed).render_chat(USER)


# --- streamed text (fault 2) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("continuation", ["Admin of the city", "é à ü, naïve", "東京と北京", "🚀🎉🇫🇷 ok", "a\n\nb  c"])
def test_streamed_text_equals_decoded_text(tok, continuation):
    prompt = tok.encode("The capital of France is")
    new = tok.encode(continuation, add_bos=False)
    detok = tok.detokenizer(prompt)
    pieces = [detok.push(token) for token in new]
    expected = tok.decode(prompt + new)[len(tok.decode(prompt)) :]
    assert "".join(pieces) == expected
    assert expected.startswith(" ")  # the space between prompt and continuation is kept
    assert not any("\ufffd" in piece for piece in pieces)  # never half a UTF-8 character
    if any(ord(c) > 0xFFFF for c in continuation):
        assert "" in pieces  # byte-fallback tokens were held back until their character was whole


# --- stop strings -----------------------------------------------------------------------------------------------
def test_stop_matcher_holds_back_and_cuts():
    stops = StopMatcher(["</answer>", "STOP"])
    assert stops.push("The answer is 4</an") == "The answer is 4"
    assert stops.push("swer> and more") == "" and stops.matched == "</answer>"
    assert stops.push("anything") == ""
    free = StopMatcher(["STOP"])
    assert free.push("ST") == "" and free.push("ARTS") == "START" and free.flush() == "S"
    with pytest.raises(MoetrtError, match="non-empty"):
        StopMatcher([""])


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abAB \n", max_size=40),
    stops=st.lists(st.text(alphabet="abAB \n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_equals_cutting_the_whole_text(text, stops, cuts):
    """However the text is split into pieces, the output is the text before the first stop string."""
    hits = [(text.find(s), s) for s in stops if s in text]
    expected = text[: min(hits)[0]] if hits else text
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + matcher.flush()
    assert out == expected


# --- generation_config.json (fault 4) ---------------------------------------------------------------------------
def test_generation_config_stop_ids_and_sampling(realistic_checkpoint, tmp_path):
    config = PRESETS["tiny"]
    hub = GenerationDefaults.from_dir(realistic_checkpoint, config)
    assert hub.stop_token_ids == (2,) and hub.sampling() == SamplingParams()  # the Hub's: greedy, stop at </s>
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 32000, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    )
    listed = GenerationDefaults.from_dir(tmp_path, config)
    assert listed.stop_token_ids == (2, 32000, 7)
    assert listed.sampling() == SamplingParams(temperature=0.6, top_k=50, top_p=0.9)  # transformers' top_k 50
    assert listed.sampling(temperature=0.0).greedy and listed.sampling(top_k=5).top_k == 5
    assert GenerationDefaults.from_dir(tmp_path / "missing", config).stop_token_ids == config.eos_token_ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(MoetrtError, match="field 'eos_token_id' must be a token id or a list"):
        GenerationDefaults.from_dir(tmp_path, config)


# --- sampling edges (fault 5) -----------------------------------------------------------------------------------
def test_sampling_edges_behave_as_their_limits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 32000)).astype(np.float32) * 4
    best = logits.argmax(-1)
    for temperature in (1e-45, 5e-324, 1e-30):  # -> greedy, never NaN
        assert (sample(logits, SamplingParams(temperature=temperature), rng) == best).all()
    assert (sample(logits, SamplingParams(temperature=1.0, top_p=1e-300), rng) == best).all()  # top_p -> 0
    draws = np.concatenate([sample(logits, SamplingParams(temperature=1e300), rng) for _ in range(200)])
    assert len(set(draws.tolist())) > 500  # temperature -> inf: uniform over the vocabulary
    huge_k = [sample(logits, SamplingParams(temperature=1.0, top_k=10**9), np.random.default_rng(s)) for s in (1, 2)]
    no_k = [sample(logits, SamplingParams(temperature=1.0), np.random.default_rng(s)) for s in (1, 2)]
    assert all((a == b).all() for a, b in zip(huge_k, no_k, strict=True))  # top_k > vocab = no top-k filter
    for bad in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_k": -1}):
        with pytest.raises(MoetrtError, match="^sampling "):
            SamplingParams(**bad)


# --- artifacts carry the text files -----------------------------------------------------------------------------
def test_artifacts_carry_every_text_file(realistic_checkpoint, tmp_path):
    carry_tokenizer(realistic_checkpoint, tmp_path)
    carried = {p.name for p in tmp_path.iterdir()}
    assert carried == {n for n in TEXT_FILES if (realistic_checkpoint / n).is_file()}
    assert {"tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model"} <= carried


# --- generation on the realistic checkpoint ---------------------------------------------------------------------
def test_generate_text_stop_string_and_chat(realistic_checkpoint, one_torch_thread):
    free = run_generate(realistic_checkpoint, prompts=["The capital of France is"], max_new_tokens=24)
    tok = Tokenizer.from_dir(realistic_checkpoint)
    prompt, new = free["prompt_token_ids"], free["token_ids"]
    assert prompt == tok.encode("The capital of France is")
    assert free["text"] == tok.decode(prompt + new)[len(tok.decode(prompt)) :]
    assert free["stop_token_ids"] == [2] and free["sampling"]["temperature"] == 0.0

    # A stop string from the middle of the free text: the text ends right before it, generation stops at the
    # token that completes it, and nothing of it is streamed.
    text = free["text"]
    start = len(text) // 2
    stop = text[start : start + 3]
    first = text.find(stop)
    streamed: list[str] = []
    cut = run_generate(
        realistic_checkpoint, prompts=["The capital of France is"], max_new_tokens=24, stop=[stop],
        on_text=streamed.append,
    )  # fmt: skip
    assert cut["text"] == "".join(streamed) == text[:first]
    assert cut["finish_reasons"] == ["stop"]
    ends = [len(tok.decode(prompt + new[: i + 1])) - len(tok.decode(prompt)) for i in range(len(new))]
    assert len(cut["token_ids"]) == next(i for i, end in enumerate(ends) if end >= first + len(stop)) + 1
    assert cut["token_ids"] == new[: len(cut["token_ids"])]

    chat = run_generate(realistic_checkpoint, chat=SYSTEM[1]["content"], system=SYSTEM[0]["content"], max_new_tokens=4)
    assert chat["prompt_token_ids"] == mistral_v1(SYSTEM)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_prints_user_and_model_text_literally(realistic_checkpoint):
    """Fault 1: prompts with "[/INST]", rich markup and emoji codes are echoed as typed, exit 0."""
    prompt = "[INST] What is 2+2? [/INST] [bold]x[/bold] :rocket:"
    result = run_cli("generate", str(realistic_checkpoint), "--prompt", prompt, "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    assert "🚀" not in result.stdout and "Traceback" not in result.stderr


def test_cli_version_and_one_line_errors(realistic_checkpoint, tmp_path):
    import moetrt

    assert run_cli("--version").stdout.strip() == f"moetrt {moetrt.__version__}"
    bad = run_cli("generate", str(realistic_checkpoint), "--chat", "hi", "--temperature", "inf")
    assert bad.returncode == 2 and bad.stderr.startswith("error: sampling temperature must be a finite number")
    assert len(bad.stderr.strip().splitlines()) == 1


# --- TextModel on a checkpoint and on an engine built from it ---------------------------------------------------
def test_text_model_opens_a_checkpoint_once(realistic_checkpoint, one_torch_thread):
    from moetrt.runtime.text_model import TextModel

    with TextModel.open(realistic_checkpoint, max_seq_len=64) as model:
        assert model.name == realistic_checkpoint.name and model.backend.name == "eager"
        assert model.config.vocab_size == 32000 and model.stop_token_ids == frozenset({2})
        assert model.chat_template.startswith("{{ bos_token }}")
        ids = model.encode_chat(USER)
        assert ids == mistral_v1(USER) and model.decode(ids) == model.render_chat(USER).removeprefix("<s>")
        assert model.encode("Hi", add_bos=False) == [15359]
        detok = model.detokenizer(ids)
        assert "".join(detok.push(t) for t in model.encode("Paris", add_bos=False)) == " Paris"


@pytest.fixture(scope="module")
def realistic_engine(realistic_checkpoint, tmp_path_factory):
    """An ORT fp32 engine of the realistic checkpoint, exported at 64 positions."""
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint

    root = tmp_path_factory.mktemp("realistic-engine")
    export = export_checkpoint(realistic_checkpoint, root / "export", max_seq_len=64, dtype="float32", progress=False)
    return export, build_ort_engine(export, root / "engine", precision="fp32", threads=1)


@pytest.mark.slow
def test_engine_carries_the_text_files_and_chats(realistic_checkpoint, realistic_engine, tmp_path):
    expected = {name for name in TEXT_FILES if (realistic_checkpoint / name).is_file()}
    for artifact in realistic_engine:
        assert expected <= {p.name for p in artifact.iterdir()}, artifact
    engine = realistic_engine[1]
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(SYSTEM))
    result = run_cli("generate", str(engine), "--messages", str(messages), "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["backend"] == "ort" and out["prompt_token_ids"] == mistral_v1(SYSTEM)
    tok = Tokenizer.from_dir(engine)
    prompt, new = out["prompt_token_ids"], out["token_ids"]
    assert out["text"] == tok.decode(prompt + new)[len(tok.decode(prompt)) :]
