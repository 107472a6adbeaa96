"""Prompts longer than the text encoder's window are errors naming what would be cut off (never a silent
truncation): the counting itself, the sampler's safety net, the trainer, and a step failing at its spec position."""
from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")

from caspec.exec.runner import run  # noqa: E402
from caspec.models.load import load_pipeline  # noqa: E402
from caspec.models.prompts import PromptTooLong, check_prompt, prompt_overflow, window  # noqa: E402
from caspec.models.sampling import encode_prompts  # noqa: E402
from caspec.spec.load import load_spec  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402
from caspec.store import LocalStore  # noqa: E402
from caspec.train import PseudoWord, TrainConfig, train_concept  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(ModelSpec(), tmp_path_factory.mktemp("p"), fresh=True)


def long_prompt(n_filler: int, tail: str = "<robot1> on mars") -> str:
    return "a photo of " + "red " * n_filler + tail


def test_window_and_exact_count(pipe):
    tok = pipe.tokenizer
    assert window(tok, pipe.text_encoder) == 77
    fits = long_prompt(70, "on mars")  # 3 + 70 + 2 = 75 tokens: exactly the window
    assert len(tok(fits).input_ids) == 77 and prompt_overflow(tok, fits) is None
    over = prompt_overflow(tok, fits + " now")
    assert over is not None and over.tokens == 76 and over.limit == 75 and over.cut == ("now",)
    # a pseudo-word counts as one token whether or not the tokenizer knows it yet
    text = long_prompt(72)
    before = prompt_overflow(tok, text, pseudo_words=["<robot1>"])
    assert before.tokens == 3 + 72 + 3 and before.cut == ("<robot1>", "on", "mars")
    assert before.cut_pseudo_words == ("<robot1>",)
    assert "`<robot1>` would be cut off" in str(pytest.raises(PromptTooLong, check_prompt, tok, text,
                                                                pseudo_words=["<robot1>"]).value)


def test_count_matches_the_tokenizer_once_pseudo_words_are_added(tmp_path):
    fresh = load_pipeline(ModelSpec(), tmp_path, fresh=True)
    fresh.tokenizer.add_tokens(["<robot1>", "<style1>"])
    for text in ["<style1> of a <robot1>, dancing!", "a " * 80 + "<robot1>", "glued<robot1>words (and, more) " * 9]:
        over = prompt_overflow(fresh.tokenizer, text)
        n = len(fresh.tokenizer(text).input_ids) - 2
        assert (over.tokens if over else n) == n, text


def test_sampler_refuses_a_long_prompt_instead_of_cutting_it(pipe):
    with pytest.raises(PromptTooLong, match="76 tokens long.*cut off: \"now\""):
        encode_prompts(pipe, [long_prompt(70, "on mars now")])
    with pytest.raises(PromptTooLong, match="the negative prompt"):
        encode_prompts(pipe, ["a cat"], "blurry " * 80)
    encode_prompts(pipe, ["a cat"], "blurry " * 80, guidance_scale=1.0)  # no unconditional pass: not read


def test_trainer_refuses_a_caption_that_would_lose_a_pseudo_word(tmp_path):
    from PIL import Image

    words = [PseudoWord("<robot1>", "robot", "constant")]
    with pytest.raises(PromptTooLong, match=r"caption 1 .*`<robot1>` would be cut off"):
        train_concept(load_pipeline(ModelSpec(), tmp_path, fresh=True), words,
                      [(Image.new("RGB", (64, 64)), long_prompt(73))], TrainConfig(phase1_steps=1, phase2_steps=0),
                      tmp_path / "a", checkpoint_dir=tmp_path / "c", preview_prompts=[])
    with pytest.raises(PromptTooLong, match="preview prompt 1"):
        train_concept(load_pipeline(ModelSpec(), tmp_path, fresh=True), words,
                      [(Image.new("RGB", (64, 64)), "a <robot1>")], TrainConfig(phase1_steps=1, phase2_steps=0),
                      tmp_path / "a", checkpoint_dir=tmp_path / "c", preview_prompts=[long_prompt(80)])
    assert not (tmp_path / "a" / "embeddings.safetensors").exists()


def test_a_long_root_prompt_fails_the_step_at_its_position(tmp_path):
    spec = tmp_path / "long.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        defaults: {{seed: 1, steps: 2}}
        roots:
          robot:
            candidates: 1
            prompt: "{long_prompt(80, 'on mars')}"
        """))
    summary = run(load_spec(spec), LocalStore(tmp_path / ".caspec"))
    outcome = summary.outcomes["robot"]
    assert outcome.status == "failed"
    assert f"{spec}:6:" in outcome.message and "roots.robot.prompt: the prompt does not fit" in outcome.message
    assert "85 tokens long" in outcome.message and "on mars" in outcome.message
    assert "shorten it" in (outcome.hint or "")
