"""Evaluation: every score against a hand-computed value, and the model-level pieces on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune_trainer import evaluate as ev
from kubetune_trainer.errors import ConfigError, DataError

# exact 1 of 4. CER: 0 + 1 (a deleted "0") + 6 ("Street" -> "Plaza", no common letter) + 11 (" on the mat"
# deleted) = 18 edits over 9 + 9 + 10 + 22 reference characters. WER: 0 + 1 + 1 + 3 = 5 over 1 + 1 + 2 + 6
# words. ROUGE-L F1: 1, 0, 1/2 (oak), and P=1 R=1/2 -> 2/3 (the cat sat).
PREDICTIONS = ["123456789", " 12345678", "Oak  Plaza", "the cat sat"]
REFERENCES = ["123456789", "123456780", "Oak Street", "the cat sat on the mat"]


def test_generation_scores_match_hand_computed_values():
    scores = ev.score_generations(PREDICTIONS, REFERENCES)
    assert scores["exact_match"] == pytest.approx(1 / 4)
    assert scores["cer"] == pytest.approx(18 / 50)
    assert scores["wer"] == pytest.approx(5 / 10)
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 1 / 2 + 2 / 3) / 4)


def test_bleu_matches_a_hand_computed_value():
    # n-gram precisions 6/6, 4/5, 3/4, 2/3; brevity penalty exp(1 - 7/6).
    expected = 100 * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25 * torch.tensor(1 - 7 / 6).exp().item()
    scores = ev.score_generations(["the cat sat on the mat"], ["the cat sat on the red mat"])
    assert scores["bleu"] == pytest.approx(expected, rel=1e-6)
    assert ev.score_generations(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100)


def test_bleu_of_short_answers_counts_the_orders_they_have():
    # Unigrams 2/3 (the code, "Oak"); the one bigram is wrong: 0, smoothed by sacrebleu's default "exp" to
    # 1/(2*1). No 3- or 4-grams, so two orders: sqrt(2/3 * 1/2). Plain BLEU would give 0.
    scores = ev.score_generations(["422390037", "Oak Plaza"], ["422390037", "Oak Street"])
    assert scores["bleu"] == pytest.approx(100 * (2 / 3 * 1 / 2) ** 0.5)
    assert ev.score_generations(["422390037"], ["422390037"])["bleu"] == pytest.approx(100)


def test_empty_predictions_are_all_errors_not_a_crash():
    scores = ev.score_generations(["", ""], ["12", "abc"])
    assert scores == {"exact_match": 0, "cer": 1.0, "wer": 1.0, "bleu": 0.0, "rouge_l": 0.0}


def test_deltas_and_the_new_token_cap():
    assert ev.compare({"loss": 1.0, "exact_match": 0.5}, {"loss": 3.0, "exact_match": 0.1}) == pytest.approx(
        {"loss": -2.0, "exact_match": 0.4}
    )
    assert ev.new_token_cap([3, 10, 4], limit=128) == 23
    assert ev.new_token_cap([200], limit=128) == 128


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture
def adapted(make_config, tokenizer):
    """A PeftModel whose adapter changes the outputs (LoRA B moved off zero), and its prepared data."""
    from kubetune_trainer.data import prepare
    from kubetune_trainer.model import apply_lora, load_model

    cfg = make_config(**{"dataset.testSplit": 0.25, "evaluation.batchSize": 4})
    model = apply_lora(load_model(cfg.model, "fp32", "sdpa"), cfg.lora, gradient_checkpointing=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return cfg, model, prepare(cfg.dataset, tokenizer)


def test_loss_does_not_depend_on_the_batch_size(adapted, tokenizer):
    _, model, data = adapted
    one, tokens = ev.token_loss(model, data.test, tokenizer.pad_token_id, batch_size=1)
    many, same_tokens = ev.token_loss(model, data.test, tokenizer.pad_token_id, batch_size=7)
    assert tokens == same_tokens == sum(sum(t != -100 for t in row["labels"][1:]) for row in data.test)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_batched_generation_gives_the_answers_one_at_a_time_gives(adapted, tokenizer):
    _, model, data = adapted
    prompts = list(data.raw["test"]["prompt"])[:12]
    alone = ev.generate_completions(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    batched = ev.generate_completions(model, tokenizer, prompts, max_new_tokens=8, batch_size=5)
    assert batched == alone
    assert len(set(alone)) > 1, "the prompts get different answers, so order matters"


def test_the_baseline_is_the_base_model_without_the_adapter(adapted, tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    cfg, model, data = adapted
    report = ev.evaluate(model, tokenizer, data, cfg, baseline=True)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_loss, _ = ev.token_loss(plain, data.test, tokenizer.pad_token_id, batch_size=4)
    torch.testing.assert_close(report.base["loss"], base_loss, rtol=1e-5, atol=1e-5)
    assert abs(report.finetuned["loss"] - report.base["loss"]) > 0.01, "the adapter was on for the fine-tuned pass"
    assert report.generated == len(data.raw["test"]) == len(report.predictions)
    first = report.predictions[0]
    assert set(first) == {"row", "prompt", "reference", "prediction", "exact", "base_prediction"}
    assert report.delta["loss"] == pytest.approx(report.finetuned["loss"] - report.base["loss"])
    assert model.active_adapters == ["default"] and all(
        p.requires_grad for n, p in model.named_parameters() if "lora_" in n
    ), "the adapter is back on, still trainable, after the baseline"


def test_the_report_files_and_status(adapted, tokenizer, tmp_path):
    cfg, model, data = adapted
    report = ev.evaluate(model, tokenizer, data, cfg.model_copy(), baseline=False)
    ev.write_report(report, tmp_path)
    body = json.loads((tmp_path / "eval.json").read_text())
    assert body["base"] is None and body["delta"] is None
    assert set(body["finetuned"]) == set(ev.HIGHER_IS_BETTER)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == report.generated and "base_prediction" not in json.loads(lines[0])
    status = report.status()
    assert status["test"]["exactMatch"] == report.finetuned["exact_match"] and status["base"] is None


def test_generation_is_capped_by_max_generation_samples(make_config, tokenizer):
    from kubetune_trainer.data import prepare

    cfg = make_config(**{"dataset.testSplit": 0.25, "evaluation.maxGenerationSamples": 3})
    task = ev.generation_task(prepare(cfg.dataset, tokenizer), cfg, tokenizer)
    assert len(task.prompts) == 3 and task.rows == [0, 1, 2]


def test_chat_prompts_end_with_the_generation_prompt_and_stop_at_the_end_of_turn(tokenizer):
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.data import PreparedData

    messages = [{"role": "user", "content": "Code of Oak?"}, {"role": "assistant", "content": "123"}]
    data = PreparedData("chat", None, None, None, raw={"test": [{"messages": messages}]})
    cfg = TrainConfig.model_validate({"model": {"nameOrPath": "x"}, "dataset": {"path": "x.jsonl"}})
    task = ev.generation_task(data, cfg, tokenizer)
    assert task.prompts == ["<|im_start|>user\nCode of Oak?<|im_end|>\n<|im_start|>assistant\n"]
    assert task.references == ["123"] and task.add_special_tokens is False
    stops = ev.stop_token_ids(None, tokenizer, chat=True)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.eos_token_id in stops


def test_no_test_split_is_a_clear_error(make_config, tokenizer):
    from kubetune_trainer.data import prepare

    cfg = make_config(**{"dataset.testSplit": 0})
    with pytest.raises(DataError, match=r"no test split to evaluate: set dataset\.testSplit above 0"):
        ev.evaluate(None, tokenizer, prepare(cfg.dataset, tokenizer), cfg, baseline=True)


def test_an_adapter_for_another_model_is_refused_naming_both(make_config, tmp_path, qa_rows):
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.model import apply_lora, load_model
    from kubetune_trainer.quickstart import build_tiny_model

    other = build_tiny_model([r["prompt"] for r in qa_rows], tmp_path / "other", hidden_size=32, layers=1, heads=2)
    cfg = make_config()
    wrong = apply_lora(load_model(cfg.model.model_copy(update={"name_or_path": str(other)}), "fp32", "sdpa"),
                       cfg.lora, gradient_checkpointing=False)  # fmt: skip
    wrong.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"does not fit model.nameOrPath=.*it was trained on .*other"):
        ev.load_adapter(base, tmp_path / "adapter", cfg)
    with pytest.raises(ConfigError, match=r"no adapter_config\.json there"):
        ev.load_adapter(base, tmp_path, cfg)
