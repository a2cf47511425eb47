import json
import sys

import pytest
import torch

from conftest import one_line_error
from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.multiple_choice import (Question, lm_eval_harness, load_questions, mcq_chat_format,
                                                 mcq_evaluator, multiple_choice_accuracy, prompt_ids)

QUESTIONS = [
    Question("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"], 0),
    Question("Which animal barks?", ["cat", "dog", "fish"], 1),
    Question("What colour is the sky on a clear day at noon?", ["green", "red", "blue", "yellow"], 2),
    Question("How many legs?", ["six", "four", "ten", "eight", "two"], 3),
    Question("Which one is a fruit?", ["apple", "stone"], 0),
    Question("Once upon a time there was a tiny model. What did it want?", ["to remember", "to forget", "sleep"], 1),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


def _reference_logprobs(model, tokenizer, q: Question, **kw) -> list[float]:
    """One question at a time, no padding, no attention mask; letters looked up in the vocabulary directly."""
    ids = torch.tensor([prompt_ids(tokenizer, q, **kw)])
    with torch.no_grad():
        last = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    letter_ids = tokenizer.convert_tokens_to_ids(["Ġ" + "ABCDE"[i] for i in range(len(q.choices))])
    return last[letter_ids].tolist()


def test_accuracy_equals_an_unbatched_per_question_computation(llama, tokenizer):
    result = multiple_choice_accuracy(llama, tokenizer, QUESTIONS, batch_size=4)
    assert result["n"] == len(QUESTIONS)
    correct = 0
    for q, got in zip(QUESTIONS, result["per_question"]):
        want = _reference_logprobs(llama, tokenizer, q)
        assert got["logprobs"] == pytest.approx(want, abs=1e-4)
        predicted = max(range(len(want)), key=want.__getitem__)
        assert got["predicted"] == predicted and got["answer"] == q.answer
        correct += predicted == q.answer
    assert result["accuracy"] == pytest.approx(correct / len(QUESTIONS))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_left_padding_does_not_change_scores(build, tokenizer):
    model = build(len(tokenizer), seed=1)
    one_by_one = multiple_choice_accuracy(model, tokenizer, QUESTIONS, batch_size=1)
    padded = multiple_choice_accuracy(model, tokenizer, QUESTIONS, batch_size=len(QUESTIONS))
    for a, b in zip(one_by_one["per_question"], padded["per_question"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    assert one_by_one["accuracy"] == padded["accuracy"]


def test_model_biased_to_one_letter_scores_its_share_of_answers(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("ĠB")] = 50.0  # always answers B
    model.lm_head = head
    model.train()
    result = multiple_choice_accuracy(model, tokenizer, QUESTIONS, batch_size=4)
    assert [p["predicted"] for p in result["per_question"]] == [1] * len(QUESTIONS)
    assert result["accuracy"] == pytest.approx(2 / 6)  # two questions have answer B
    assert model.training  # the model's mode is restored


def test_prompts_end_where_the_letter_token_follows(tokenizer):
    q = QUESTIONS[0]
    plain = prompt_ids(tokenizer, q, shots=[QUESTIONS[1]])
    text = tokenizer.decode(plain)
    assert text.endswith("A. Paris\nB. Rome\nC. Madrid\nD. Berlin\nAnswer:")
    assert "Which animal barks?" in text and "C. fish\nAnswer: B\n\n" in text  # the few-shot demo, answered
    assert tokenizer(text + " A")["input_ids"] == plain + [tokenizer.convert_tokens_to_ids("ĠA")]
    chat = prompt_ids(tokenizer, q, chat=True)
    chat_text = tokenizer.decode(chat)
    assert chat_text.startswith("<|im_start|>user\nAnswer the following multiple choice question.")
    assert chat_text.endswith("D) Berlin<|im_end|>\n<|im_start|>assistant\nANSWER:")
    assert tokenizer(chat_text + " C", add_special_tokens=False)["input_ids"] == \
        chat + [tokenizer.convert_tokens_to_ids("ĠC")]


def test_chat_and_few_shot_scores_match_reference(llama, tokenizer):
    for kw, call in [(dict(chat=True), dict(chat=True)), (dict(), dict(few_shot=2))]:
        result = multiple_choice_accuracy(llama, tokenizer, QUESTIONS, batch_size=3, **call)
        for i, (q, got) in enumerate(zip(QUESTIONS, result["per_question"])):
            shots = [QUESTIONS[(i + 1 + j) % len(QUESTIONS)] for j in range(call.get("few_shot", 0))]
            assert got["logprobs"] == pytest.approx(_reference_logprobs(llama, tokenizer, q, shots=shots, **kw),
                                                    abs=1e-4)


def test_load_questions_in_mmlu_arc_and_csqa_shapes(tmp_path):
    records = [
        {"question": "q1", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"question": "q2", "choices": ["a", "b"], "answer": "B"},
        {"question": "q3", "choices": {"label": ["1", "2", "3"], "text": ["a", "b", "c"]}, "answerKey": "3"},
        {"question": {"stem": "q4", "choices": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}]},
         "answerKey": "B"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_questions(str(path)) == [Question("q1", ["a", "b", "c", "d"], 2), Question("q2", ["a", "b"], 1),
                                         Question("q3", ["a", "b", "c"], 2), Question("q4", ["x", "y"], 1)]


@pytest.mark.parametrize("record, words", [
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, ["record 1", "out of range"]),
    ({"question": "q", "choices": ["a", "b"]}, ["record 1", "answer"]),
    ({"question": "q", "choices": ["a"], "answer": 0}, ["record 1", "choices"]),
    ({"prompt": "q", "choices": ["a", "b"], "answer": 0}, ["record 1", "question"]),
])
def test_bad_questions_give_one_line_errors(tmp_path, record, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(SelfReplayError) as e:
        load_questions(str(path))
    one_line_error(e, "bad.jsonl", *words)


def test_bad_scoring_arguments(llama, tokenizer):
    with pytest.raises(SelfReplayError) as e:
        multiple_choice_accuracy(llama, tokenizer, QUESTIONS, few_shot=6)
    one_line_error(e, "few_shot=6")
    with pytest.raises(SelfReplayError) as e:
        multiple_choice_accuracy(llama, tiny_tokenizer(chat_template=False), QUESTIONS, chat=True)
    one_line_error(e, "chat template")
    letters_split = [Question("q", [str(i) for i in range(6)], 0)]  # " F" is not a single token
    with pytest.raises(SelfReplayError) as e:
        multiple_choice_accuracy(llama, tokenizer, letters_split)
    one_line_error(e, "' F'", "one token")


def test_lm_eval_missing_gives_a_clear_error(monkeypatch, llama, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    with pytest.raises(SelfReplayError) as e:
        lm_eval_harness(llama, tokenizer, ["arc_easy"])
    one_line_error(e, "lm_eval", "pip install")


@pytest.mark.parametrize("chat", [False, True])
def test_a_causal_lm_scores_like_the_plain_model(llama, tokenizer, tmp_path, chat):
    """The engine's CausalLM (last position through the head only) and load_hf give the plain model's scores."""
    from selfreplay.models.core import CausalLM
    from selfreplay.models.hf import HF_ADAPTER, load_hf

    llama.save_pretrained(tmp_path / "llama")
    plain = multiple_choice_accuracy(llama, tokenizer, QUESTIONS, batch_size=4, chat=chat)
    for model in (CausalLM(llama, HF_ADAPTER), load_hf(str(tmp_path / "llama"))):
        model.train()
        wrapped = multiple_choice_accuracy(model, tokenizer, QUESTIONS, batch_size=4, chat=chat)
        assert wrapped["accuracy"] == plain["accuracy"] and wrapped["n"] == plain["n"]
        for a, b in zip(plain["per_question"], wrapped["per_question"]):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
            assert a["predicted"] == b["predicted"]
        assert model.training  # the mode is restored


def test_mcq_evaluator_logs_each_set_and_their_average(llama, tokenizer):
    evaluate = mcq_evaluator({"first": QUESTIONS[:3], "rest": QUESTIONS[3:]}, tokenizer, "plain", batch_size=2)
    out = evaluate(llama)
    first = multiple_choice_accuracy(llama, tokenizer, QUESTIONS[:3])["accuracy"]
    rest = multiple_choice_accuracy(llama, tokenizer, QUESTIONS[3:])["accuracy"]
    assert out == pytest.approx({"mcq_first_accuracy": first, "mcq_rest_accuracy": rest,
                                 "mcq_average_accuracy": (first + rest) / 2})
    assert mcq_chat_format(tokenizer) is True and mcq_chat_format(tiny_tokenizer(chat_template=False)) is False
    assert mcq_chat_format(tokenizer, "plain") is False
    with pytest.raises(SelfReplayError) as e:
        mcq_chat_format(tokenizer, "json")
    one_line_error(e, "mcq_format='json'")
