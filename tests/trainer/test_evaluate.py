"""Evaluation: every score against a hand-computed value, and the model-level pieces on the tiny model."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil

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


def test_rouge_keeps_case_and_every_script_as_exact_match_and_wer_do():
    # ROUGE-L F1 per row: 1 (identical Cyrillic), 1 (identical CJK), 0 (case differs: no common word), so 2/3;
    # rouge-score's own tokenizer gives 0, 0, 1. WER: 2 substitutions over 2 + 1 + 2 words; CER: 2 over 10 + 2 + 9.
    scores = ev.score_generations(["Привет мир", "東京", "Oak Plaza"], ["Привет мир", "東京", "oak plaza"])
    assert scores["rouge_l"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["wer"] == pytest.approx(2 / 5)
    assert scores["cer"] == pytest.approx(2 / 21)


def test_an_answer_to_an_empty_reference_counts_as_errors():
    # Row 1: both empty, 0 edits. Row 2: "abc" where "" was expected: 3 character and 1 word insertions.
    # Row 3: "x y" for "x": 2 character insertions (" ", "y") and 1 word. Reference length: 1 character, 1 word.
    # ROUGE-L: 1 (empty for empty), 0, and P=1/2 R=1 -> 2/3.
    scores = ev.score_generations(["", "abc", "x y"], ["", "", "x"])
    assert scores["cer"] == pytest.approx((0 + 3 + 2) / 1)
    assert scores["wer"] == pytest.approx((0 + 1 + 1) / 1)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    # Only empty references: no length to divide by; right (all empty) is 0, anything else 1.
    assert ev.error_rate(["", ""], ["", ""], unit="char") == 0.0
    assert ev.error_rate(["", ""], ["a", ""], unit="word") == 1.0


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


def hf_mean_token_loss(model, rows) -> float:
    """The test rows' mean target-token loss from the plain forward pass with labels, one row at a time
    (transformers shifts the labels and averages per row; weighting by the row's target tokens gives the mean
    over all of them), independent of evaluate.py's batching, padding and loss code."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


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
    torch.testing.assert_close(report.base["loss"], hf_mean_token_loss(plain, data.test), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report.finetuned["loss"], hf_mean_token_loss(model, data.test), rtol=1e-5, atol=1e-5)
    for side in (report.finetuned, report.base):
        assert side["perplexity"] == pytest.approx(math.exp(side["loss"]))
    assert abs(report.finetuned["loss"] - report.base["loss"]) > 0.01, "the adapter was on for the fine-tuned pass"
    assert report.generated == len(data.raw["test"]) == len(report.predictions)
    first = report.predictions[0]
    assert set(first) == {"row", "prompt", "reference", "prediction", "exact", "base_prediction"}
    assert report.delta["loss"] == pytest.approx(report.finetuned["loss"] - report.base["loss"])
    assert model.active_adapters == ["default"] and all(
        p.requires_grad for n, p in model.named_parameters() if "lora_" in n
    ), "the adapter is back on, still trainable, after the baseline"


def test_generation_uses_the_token_cap_and_the_batch_size_and_reports_progress(adapted, tokenizer):
    cfg, model, data = adapted  # evaluation.batchSize 4
    calls = []
    report = ev.evaluate(model, tokenizer, data, cfg, baseline=True, on_progress=lambda *c: calls.append(c))

    references = list(data.raw["test"]["completion"])
    lengths = [len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    assert report.max_new_tokens == ev.new_token_cap(lengths, cfg.evaluation.max_new_tokens)
    prompts = list(data.raw["test"]["prompt"])
    stops = ev.stop_token_ids(model, tokenizer, chat=False)

    def answers(cap: int) -> list[str]:
        generated = ev.generate_completions(model, tokenizer, prompts, max_new_tokens=cap, batch_size=1, stop_ids=stops)
        return [ev.normalize(a) for a in generated]

    assert [p["prediction"] for p in report.predictions] == answers(report.max_new_tokens)
    assert answers(report.max_new_tokens + 8) != answers(report.max_new_tokens), "the cap shortens the answers"

    # One call per batch of 4, done rising to the total, in every stage, in order.
    rows, generated = len(data.test), report.generated
    expected = [
        (stage, min(done, total), total)
        for stage, total in (
            ("loss", rows),
            ("generation", generated),
            ("base loss", rows),
            ("base generation", generated),
        )
        for done in range(4, total + 4, 4)
    ]
    assert calls == expected
    assert {stage for stage, _, _ in calls} == set(ev.STAGES)


def test_the_report_files_and_status(adapted, tokenizer, tmp_path):
    cfg, model, data = adapted
    report = ev.evaluate(model, tokenizer, data, cfg.model_copy(), baseline=False)
    ev.write_report(report, tmp_path)
    body = json.loads((tmp_path / "eval.json").read_text())
    assert body["base"] is None and body["delta"] is None
    assert set(body["finetuned"]) == set(ev.METRICS)
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


def save_adapter_of(model_dir, cfg, out_dir, seed: int = 1):
    """An adapter trained (LoRA B moved off zero) on the model in model_dir, saved to out_dir; the PeftModel."""
    from kubetune_trainer.model import apply_lora, load_model

    model_cfg = cfg.model.model_copy(update={"name_or_path": str(model_dir)})
    model = apply_lora(load_model(model_cfg, "fp32", "sdpa"), cfg.lora, gradient_checkpointing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return model


def test_an_adapter_for_another_model_is_refused_naming_both(make_config, tmp_path, qa_rows):
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.quickstart import build_tiny_model

    other = build_tiny_model([r["prompt"] for r in qa_rows], tmp_path / "other", hidden_size=32, layers=1, heads=2)
    cfg = make_config()
    save_adapter_of(other, cfg, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"does not fit model.nameOrPath=.*it was trained on .*other"):
        ev.load_adapter(base, tmp_path / "adapter", cfg)
    with pytest.raises(ConfigError, match=r"no adapter_config\.json there"):
        ev.load_adapter(base, tmp_path, cfg)
    # A half-copied adapter: peft would go looking on the Hub for the weights.
    (tmp_path / "config-only").mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", tmp_path / "config-only")
    with pytest.raises(ConfigError, match=r"adapter_config\.json but no adapter_model\.safetensors"):
        ev.load_adapter(base, tmp_path / "config-only", cfg)
    # A setting peft cannot take.
    broken = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**broken, "r": "x"}))
    fresh = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"adapter_config\.json is not a peft config"):
        ev.load_adapter(fresh, tmp_path / "adapter", cfg)


@pytest.mark.parametrize(
    ("adapter_layers", "base_layers", "message"),
    [
        # A deeper model's adapter: its layer 2 weights have nowhere to go (peft drops them silently).
        (
            3,
            2,
            r"the adapter has weights for 7 modules model\.nameOrPath=\S+ lacks \(model\.layers\.2\.mlp\.down_proj, ",
        ),
        # A shallower model's adapter naming its modules by suffix: layer 2 gets an adapter with no weights
        # to load (peft only warns of missing keys).
        (
            2,
            3,
            r"model\.nameOrPath=\S+ has 7 modules the adapter has no weights for \(model\.layers\.2\.mlp\.down_proj, ",
        ),
        # A one-layer model's adapter names layer 0's modules by path: layer 1 of the base gets no adapter at all,
        # and nothing is reported missing.
        (
            1,
            2,
            r"model\.nameOrPath=\S+ has 7 modules the adapter has no weights for \(model\.layers\.1\.mlp\.down_proj, ",
        ),
    ],
)
def test_an_adapter_for_a_model_of_another_depth_is_refused(
    make_config, tmp_path, qa_rows, adapter_layers, base_layers, message
):
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.quickstart import build_tiny_model

    # The fixtures' tokenizer and width (64); only the number of layers differs.
    texts = [r["prompt"] + r["completion"] for r in qa_rows]
    models = {n: build_tiny_model(texts, tmp_path / f"layers{n}", hidden_size=64, layers=n, heads=2, vocab_size=320)
              for n in {adapter_layers, base_layers}}  # fmt: skip
    cfg = make_config(**{"model.nameOrPath": str(models[base_layers])})
    save_adapter_of(models[adapter_layers], cfg, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(models[base_layers], dtype=torch.float32)
    with pytest.raises(ConfigError) as err:
        ev.load_adapter(base, tmp_path / "adapter", cfg)
    text = str(err.value)
    assert f"does not fit model.nameOrPath={models[base_layers]}: it was trained on {models[adapter_layers]}" in text
    assert re.search(message, text), text
    assert "set model.nameOrPath to its base model" in text


def test_a_fitting_adapter_loads_its_weights_and_a_renamed_base_is_warned_about(make_config, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    cfg = make_config()
    trained = save_adapter_of(cfg.model.name_or_path, cfg, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with caplog.at_level(logging.WARNING, logger=ev.__name__):
        loaded = ev.load_adapter(
            AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path), tmp_path / "adapter", cfg
        )
    assert not caplog.records, "the same model: nothing to warn about"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)

    # The same weights under another name: it loads, with a warning naming both.
    copy = shutil.copytree(cfg.model.name_or_path, tmp_path / "renamed-base")
    renamed = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(copy)})})
    with caplog.at_level(logging.WARNING, logger=ev.__name__):
        ev.load_adapter(AutoModelForCausalLM.from_pretrained(copy), tmp_path / "adapter", renamed)
    assert len(caplog.records) == 1
    assert f"was trained on {cfg.model.name_or_path}, not model.nameOrPath={copy}" in caplog.records[0].getMessage()


def test_model_names_compare_by_their_last_part():
    assert ev.same_model_name("Qwen/Qwen2.5-0.5B", "/models/qwen2.5-0.5B/")
    assert not ev.same_model_name("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B")
    keys = ["base_model.model.model.layers.10.mlp.up_proj.lora_A.weight", "base_model.model.lm_head.weight",
            "base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"]  # fmt: skip
    assert ev.adapter_modules(keys) == ["lm_head", "model.layers.2.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    modules = [
        "model.layers.0.mlp",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
        "model.norm",
        "lm_head",
    ]
    assert ev.uncovered_modules(modules, ["model.layers.0.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert ev.uncovered_modules(modules, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]) == []
    missing = ["base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight"]
    assert ev.fit_problems(missing, [], ["model.layers.1.mlp.up_proj"], "M") == (
        "M has 1 module the adapter has no weights for (model.layers.1.mlp.up_proj)"
    )
    assert ev.fit_problems([], [], [], "M") is None
