"""Toy tasks: layout, answers, sizes, determinism; greedy decoding with the KV cache; accuracy."""

import pytest
import torch

from selfreplay.models.gpt import GPTConfig as ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.models.gpt import GPT
from selfreplay.data.toy import (DIGIT0, EOS, EQ, NULL, PROMPT_LEN, SEP, SEQ_LEN, TASK_TOKEN, TASKS, VOCAB_SIZE, encode,
                            evaluate_tasks, exact_match, greedy_decode, make_task, make_tasks, to_text)


def number(digit_tokens) -> int:
    return int("".join(str(int(t) - DIGIT0) for t in digit_tokens))


def expected_answer(task: str, a: int, b: int) -> int:
    """Plain-Python reference answers."""
    a_str = f"{a:03d}"
    return {"add": a + b, "modadd": (a + b) % 1000, "reversal": int(a_str[::-1]),
            "sort": int("".join(sorted(a_str)))}[task]


@pytest.mark.parametrize("task", TASKS)
def test_layout_and_answers(task):
    data = make_task(task, n_train=2000, n_valid=500, seed=3)
    rows = torch.cat((data.train, data.valid))
    assert rows.shape == (2500, SEQ_LEN) and rows.dtype == torch.long
    assert (rows >= 0).all() and (rows < VOCAB_SIZE).all()
    assert (rows[:, 0] == TASK_TOKEN[task]).all()
    assert (rows[:, 4] == SEP).all() and (rows[:, 8] == EQ).all() and (rows[:, 13] == EOS).all()
    assert (rows[:, 1:4] >= DIGIT0).all() and (rows[:, 9:13] >= DIGIT0).all()
    if task in ("reversal", "sort"):
        assert (rows[:, 5:8] == NULL).all()
    for row in rows:
        a = number(row[1:4])
        b = number(row[5:8]) if task in ("add", "modadd") else 0
        assert number(row[9:13]) == expected_answer(task, a, b), to_text(row)


@pytest.mark.parametrize("task", TASKS)
def test_every_single_operand_and_edge_cases(task):
    a = torch.arange(1000)
    b = torch.flip(a, [0])
    rows = encode(task, a, b)
    for row, x, y in zip(rows, a.tolist(), b.tolist()):
        assert number(row[9:13]) == expected_answer(task, x, y if task in ("add", "modadd") else 0)
    edges = encode(task, torch.tensor([999, 0, 500, 120, 7]), torch.tensor([999, 0, 500, 1, 993]))
    texts = [to_text(r) for r in edges]
    want = {"add": ["1 9 9 8", "0 0 0 0", "1 0 0 0", "0 1 2 1", "1 0 0 0"],
            "modadd": ["0 9 9 8", "0 0 0 0", "0 0 0 0", "0 1 2 1", "0 0 0 0"],
            "reversal": ["0 9 9 9", "0 0 0 0", "0 0 0 5", "0 0 2 1", "0 7 0 0"],
            "sort": ["0 9 9 9", "0 0 0 0", "0 0 0 5", "0 0 1 2", "0 0 0 7"]}[task]
    for text, answer in zip(texts, want):
        assert text.endswith(f"= {answer} <eos>"), text


def test_sizes_determinism_and_disjoint_validation():
    tasks = make_tasks(seed=0)
    assert [t.name for t in tasks] == list(TASKS)
    for t in tasks:
        assert t.train.shape == (65_536, SEQ_LEN) and t.valid.shape == (4_096, SEQ_LEN)
    again = make_task("add", seed=0)
    assert torch.equal(again.train, tasks[0].train) and torch.equal(again.valid, tasks[0].valid)
    assert not torch.equal(make_task("add", seed=1).train, tasks[0].train)
    for t in (tasks[0], tasks[3]):  # two-operand tasks: validation pairs never seen in training
        train_pairs = set(map(tuple, t.train[:, 1:8].tolist()))
        assert not any(tuple(r) in train_pairs for r in t.valid[:, 1:8].tolist())
    assert len({tuple(r) for r in tasks[0].train[:, 1:8].tolist()}) == 65_536


def test_bad_input():
    with pytest.raises(SelfReplayError):
        make_task("multiply")
    with pytest.raises(SelfReplayError):
        make_task("add", n_train=0)
    with pytest.raises(SelfReplayError):
        make_task("add", n_train=999_000, n_valid=2_000)
    with pytest.raises(SelfReplayError):
        encode("add", torch.tensor([1000]), torch.tensor([1]))


def greedy_without_cache(model, prompts, steps):
    """Reference: recompute the whole prefix at every step."""
    seq = prompts
    for _ in range(steps):
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq[:, prompts.shape[1]:]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_cache_matches_no_cache(seed):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(d_model=32, n_layers=2, head_dim=8, context=SEQ_LEN, vocab_size=VOCAB_SIZE)).eval()
    prompts = torch.cat([make_task(t, 8, 8, seed).valid[:, :PROMPT_LEN] for t in TASKS])
    with torch.no_grad():
        cached = greedy_decode(model, prompts)
        reference = greedy_without_cache(model, prompts, SEQ_LEN - PROMPT_LEN)
    assert cached.shape == (32, 5)
    assert torch.equal(cached, reference)


def test_exact_match_hand_made():
    rows = encode("add", torch.tensor([123, 500, 999]), torch.tensor([456, 500, 1]))  # answers 0579, 1000, 1000
    answers = rows[:, PROMPT_LEN:].clone()
    assert exact_match(answers, rows).tolist() == [True, True, True]
    answers[0, 3] = DIGIT0 + 8  # last digit wrong
    answers[1, 4] = DIGIT0  # digit instead of EOS
    assert exact_match(answers, rows).tolist() == [False, False, True]
    with pytest.raises(SelfReplayError):
        exact_match(answers[:, :4], rows)


class AnswerKey(torch.nn.Module):
    """A stand-in model that knows every answer, except that it gets ``wrong`` rows' last digit wrong."""

    def __init__(self, rows: torch.Tensor, wrong: set[int]):
        super().__init__()
        self.key = {tuple(r[:PROMPT_LEN].tolist()): r.clone() for r in rows}
        for i in wrong:
            r = self.key[tuple(rows[i, :PROMPT_LEN].tolist())]
            r[12] = DIGIT0 + (int(r[12]) - DIGIT0 + 1) % 10

    def new_kv_cache(self, batch_size):
        return {"seen": None}

    def forward(self, tokens, cache=None):
        if cache is not None:
            cache["seen"] = tokens if cache["seen"] is None else torch.cat((cache["seen"], tokens), dim=1)
            tokens = cache["seen"]
        B, T = tokens.shape
        logits = torch.zeros(B, T, VOCAB_SIZE)
        for b in range(B):
            answer = self.key[tuple(tokens[b, :PROMPT_LEN].tolist())]
            for t in range(T):
                logits[b, t, answer[min(t + 1, SEQ_LEN - 1)]] = 10.0
        return logits[:, -tokens.shape[1]:] if cache is None else logits[:, -1:]


@pytest.mark.parametrize("seed", [0, 1])
def test_one_forward_accuracy_is_greedy_decodings_exact_match(seed):
    """A real model's own greedy answers count as right, rows changed at one answer position as wrong: the same
    per-task accuracy as decoding greedily with the cache and comparing (not the same computation)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(d_model=32, n_layers=2, head_dim=8, context=SEQ_LEN, vocab_size=VOCAB_SIZE)).eval()
    add, sort = make_task("add", 8, 24, seed), make_task("sort", 8, 16, seed)
    valid = {}
    for name, task in (("add", add), ("sort", sort)):
        prompts = task.valid[:, :PROMPT_LEN]
        rows = torch.cat((prompts, greedy_decode(model, prompts)), dim=1)
        for i, position in enumerate(range(PROMPT_LEN, SEQ_LEN)):  # row 3i changed at answer position i
            rows[3 * i, position] = (rows[3 * i, position] + 1 + seed) % VOCAB_SIZE
        valid[name] = rows
    expected = {name: exact_match(greedy_decode(model, rows[:, :PROMPT_LEN]), rows).double().mean().item()
                for name, rows in valid.items()}
    assert expected == {"add": pytest.approx(19 / 24), "sort": pytest.approx(11 / 16)}
    metrics = evaluate_tasks(model, valid, batch_size=9)
    assert metrics["accuracy"] == expected


def test_evaluate_tasks_accuracy_per_task():
    add, sort = make_task("add", 10, 20, seed=5), make_task("sort", 10, 10, seed=5)
    rows = torch.cat((add.valid, sort.valid))
    model = AnswerKey(rows, wrong={0, 1, 2, 3, 4, 25})  # 5 of 20 add rows wrong, 1 of 10 sort rows wrong
    metrics = evaluate_tasks(model, {"add": add.valid, "sort": sort.valid}, batch_size=7)
    assert metrics["accuracy"] == {"add": pytest.approx(0.75), "sort": pytest.approx(0.9)}
    assert set(metrics["loss"]) == {"add", "sort"}
    assert all(v >= 0 for v in metrics["loss"].values())
